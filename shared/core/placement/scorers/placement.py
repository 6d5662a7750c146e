"""placement (max 100): the model's placement strategy: GPUStack's binpack or spread when the model names
one (exactly their formulas), else Gantry's default, the multi-resource fragmentation scorer."""

from __future__ import annotations

from collections.abc import Sequence

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Candidate, PlacementStrategy
from shared.core.placement.fitting.cpu_only import RowBatch
from shared.core.placement.fitting.multi_gpu import GpuSetBatch
from shared.core.placement.fitting.single_gpu import GpuBatch
from shared.core.placement.scorers.base import Scorer, SlotRows
from shared.core.placement.scorers.binpack import Binpack
from shared.core.placement.scorers.fragmentation import Fragmentation
from shared.core.placement.scorers.spread import Spread
from shared.core.placement.snapshot import FloatArray, IntArray


class Placement(Scorer):
    """Dispatches to the model's strategy; always enabled for scale-up in the default profile."""

    name = "placement"
    max_score = 100.0

    def _pick(self, ctx: PlacementContext) -> Scorer:
        strategy = ctx.model.placement_strategy
        if strategy == PlacementStrategy.BINPACK:
            return Binpack.configured()
        if strategy == PlacementStrategy.SPREAD:
            return Spread.configured()
        return Fragmentation.configured()

    def score(self, ctx: PlacementContext, candidates: Sequence[Candidate]) -> list[float]:
        """Reference path."""
        return self._pick(ctx).score(ctx, candidates)

    def score_batch(self, ctx: PlacementContext, batch: GpuBatch) -> FloatArray | None:
        """Fast path."""
        return self._pick(ctx).score_batch(ctx, batch)

    def slot_rows(self, ctx: PlacementContext, claims: IntArray, ram_claim: int, cpu_claim: int) -> SlotRows | None:
        """Row-local form: the model's strategy's, if it has one."""
        return self._pick(ctx).slot_rows(ctx, claims, ram_claim, cpu_claim)

    def score_sets(self, ctx: PlacementContext, batch: GpuSetBatch) -> FloatArray | None:
        """Fast path for multi-GPU candidates."""
        return self._pick(ctx).score_sets(ctx, batch)

    def score_rows(self, ctx: PlacementContext, batch: RowBatch) -> FloatArray | None:
        """Fast path for CPU-only candidates."""
        return self._pick(ctx).score_rows(ctx, batch)
