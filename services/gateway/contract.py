"""What the gateway's endpoint picker reads and writes on the bus (its data plane is Envoy ext_proc, see
docs/gateway.md)."""

from __future__ import annotations

from shared.bus import subjects
from shared.bus.messages import (
    EndpointOutcomes,
    EngineKVEvents,
    EngineMetrics,
    ErrorEvent,
    InstanceEvents,
    KVSnapshotRequest,
)
from shared.host.contract import Consumes, Contract, Emits

CONTRACT = Contract(
    service="gateway",
    description="Gantry's endpoint picker behind Envoy: routes each request with the routing core, keeping its "
                "pool and load from the model servers' own reports (every replica reads every report) and, with "
                "the pool from placement, admitting only engines whose instance is RUNNING.",
    consumes=(
        Consumes(subjects.ENGINE_METRICS_ALL, EngineMetrics, "the pool (an engine joins with its first report, "
                 "leaves when silent) and each engine's load"),
        Consumes(subjects.ENGINE_KV_EVENTS_ALL, EngineKVEvents, "the precise prefix index; a gap in an engine's "
                 "numbering clears what is known of its cache"),
        Consumes(subjects.EVENT_INSTANCE_ALL, InstanceEvents, "placement's instance changes (--pool-source "
                 "placement): an engine is routable only while its instance is RUNNING; DRAINING or removed takes "
                 "it out of the pool at once"),
        Consumes(subjects.GATEWAY_OUTCOMES, EndpointOutcomes, "the other picker replicas' engine failures, counted "
                 "as this replica's own (its own messages and duplicates dropped)"),
    ),
    emits=(
        Emits(subjects.ENGINE_KV_SNAPSHOT_ALL, KVSnapshotRequest, "asks an engine it first routes to (or lost KV "
              "events of) for its prefix-cache snapshot (request/reply; the answer is signed like its reports)"),
        Emits(subjects.GATEWAY_OUTCOMES, EndpointOutcomes, "each engine failure it saw, and the first success "
              "after failures, every 50 ms when there are any, and each second the engines it counts as failing: "
              "every replica leaves a broken engine out after three failures in all, one started later too"),
        Emits(subjects.dead_letter("gateway"), ErrorEvent, "an engine report it rejected, and why"),
    ),
)
