"""What a model server emits and answers on the bus (its HTTP API is documented in docs/engine.md)."""

from __future__ import annotations

from shared.bus import subjects
from shared.bus.messages import EngineKVEvents, EngineMetrics, KVSnapshotRequest
from shared.host.contract import Consumes, Contract, Emits

CONTRACT = Contract(
    service="engine_server",
    description="A model server (the emulated vLLM-like engine, or a real one): its load for routing.",
    consumes=(
        Consumes(subjects.ENGINE_KV_SNAPSHOT_ALL, KVSnapshotRequest, "a picker asks for this server's prefix-cache "
                 "snapshot on gantry.engine.kvsnap.<instance id>; the answer, an EngineKVSnapshot (the cached block "
                 "hashes and the first KV message not in them, signed like a report), goes to its inbox"),
    ),
    emits=(
        Emits(subjects.ENGINE_METRICS_ALL, EngineMetrics, "running/waiting requests and KV-cache use, every "
              "50-100 ms, on gantry.engine.metrics.<instance id>"),
        Emits(subjects.ENGINE_KV_EVENTS_ALL, EngineKVEvents, "KV-cache events (vLLM's schema) after each step "
              "that changed the prefix cache, numbered per instance, on gantry.engine.kv.<instance id>"),
    ),
)
