"""What a model server emits on the bus (its HTTP API is documented in docs/engine.md)."""

from __future__ import annotations

from shared.bus import subjects
from shared.bus.messages import EngineKVEvents, EngineMetrics
from shared.host.contract import Contract, Emits

CONTRACT = Contract(
    service="engine_server",
    description="A model server (the emulated vLLM-like engine, or a real one): its load for routing.",
    consumes=(),
    emits=(
        Emits(subjects.ENGINE_METRICS_ALL, EngineMetrics, "running/waiting requests and KV-cache use, every "
              "50-100 ms, on gantry.engine.metrics.<instance id>"),
        Emits(subjects.ENGINE_KV_EVENTS_ALL, EngineKVEvents, "KV-cache events (vLLM's schema) after each step "
              "that changed the prefix cache, numbered per instance, on gantry.engine.kv.<instance id>"),
    ),
)
