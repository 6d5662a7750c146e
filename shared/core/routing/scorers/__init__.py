"""Scorer plugins, registered by type name (one module each)."""

from __future__ import annotations

from shared.core.routing.plugin import Scorer
from shared.core.routing.scorers.active_requests import ActiveRequestScorer
from shared.core.routing.scorers.kv_utilization import KvUtilizationScorer
from shared.core.routing.scorers.lora_affinity import LoraAffinityScorer
from shared.core.routing.scorers.no_hit_lru import NoHitLruScorer
from shared.core.routing.scorers.predicted_latency import PredictedLatencyScorer
from shared.core.routing.scorers.prefix import PrefixCacheScorer
from shared.core.routing.scorers.queue import QueueScorer
from shared.core.routing.scorers.running import RunningRequestsScorer
from shared.core.routing.scorers.token_load import TokenLoadScorer

SCORERS: dict[str, type[Scorer]] = {
    cls.type_name: cls
    for cls in (QueueScorer, KvUtilizationScorer, RunningRequestsScorer, ActiveRequestScorer, TokenLoadScorer,
                PrefixCacheScorer, LoraAffinityScorer, NoHitLruScorer, PredictedLatencyScorer)
}

__all__ = ["SCORERS", "Scorer"]
