"""offload_layers (max 10): GGUF instances with more layers on the GPU are kept."""

from __future__ import annotations

from collections.abc import Sequence

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Instance
from shared.core.placement.scaledown.base import ScaleDownScorer


class OffloadLayersKeep(ScaleDownScorer):
    """``10 × offloaded / total`` for instances that report layers, else 0."""

    name = "offload_layers"
    max_score = 10.0

    def score(self, ctx: PlacementContext, instances: Sequence[Instance]) -> list[float]:
        """Per instance."""
        out = []
        for inst in instances:
            total, offloaded = inst.total_layers, inst.offload_layers
            out.append(10.0 * offloaded / total if total and offloaded is not None else 0.0)
        return out
