"""What the gateway's endpoint picker reads and writes on the bus (its data plane is Envoy ext_proc, see
docs/gateway.md)."""

from __future__ import annotations

from shared.bus import subjects
from shared.bus.messages import EndpointOutcomes, ErrorEvent
from shared.host.contract import Consumes, Contract, Emits
from shared.host.engine_feed import FEED_CONSUMES, SNAPSHOT_EMITS

CONTRACT = Contract(
    service="gateway",
    description="Gantry's endpoint picker behind Envoy: routes each request with the routing core, keeping its "
                "pool and load from the model servers' own reports (every replica reads every report) and, with "
                "the pool from placement, admitting only engines whose instance is RUNNING.",
    consumes=(
        *FEED_CONSUMES,
        Consumes(subjects.GATEWAY_OUTCOMES, EndpointOutcomes, "the other picker replicas' engine failures, counted "
                 "as this replica's own (its own messages and duplicates dropped)"),
    ),
    emits=(
        SNAPSHOT_EMITS,
        Emits(subjects.GATEWAY_OUTCOMES, EndpointOutcomes, "each engine failure it saw, and the first success "
              "after failures, every 50 ms when there are any, and each second the engines it counts as failing: "
              "every replica leaves a broken engine out after three failures in all, one started later too"),
        Emits(subjects.dead_letter("gateway"), ErrorEvent, "an engine report it rejected, and why"),
    ),
)
