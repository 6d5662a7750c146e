"""worker_fill (max 1, beyond baseline): binpack models fill a started worker before opening another.

The spec's binpack formula looks at one GPU; with utilisation claims every fresh GPU scores the same, so
an empty worker and a half-used one tie. This scorer adds ``1 − Σ allocatable / Σ total`` over the
candidate worker's GPUs (mean over a multi-worker candidate's workers). Spread models score 0 here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Candidate, PlacementStrategy
from shared.core.placement.fitting.cpu_only import RowBatch
from shared.core.placement.fitting.multi_gpu import GpuSetBatch
from shared.core.placement.fitting.single_gpu import GpuBatch
from shared.core.placement.scorers.base import Scorer, SlotRows
from shared.core.placement.snapshot import FloatArray, IntArray

MAX = 1.0


def worker_fill(ctx: PlacementContext, name: str) -> float:
    """Fraction of the worker's VRAM already taken (claims, external use, reserve)."""
    gpus = ctx.view(name).gpus
    total = sum(g.total for g in gpus)
    if total <= 0:
        return 0.0
    free = sum(min(max(g.allocatable, 0), g.total) for g in gpus)
    return (total - free) / total


class WorkerFill(Scorer):
    """Prefers the fullest worker for binpack models."""

    name = "worker_fill"
    max_score = MAX

    def score(self, ctx: PlacementContext, candidates: Sequence[Candidate]) -> list[float]:
        """Reference path."""
        if ctx.model.placement_strategy != PlacementStrategy.BINPACK:
            return [0.0 for _ in candidates]
        out = []
        for cand in candidates:
            names = [cand.worker] + [s.worker for s in cand.subordinates]
            out.append(MAX * sum(worker_fill(ctx, n) for n in names) / len(names))
        return out

    def _fill_rows(self, ctx: PlacementContext, rows: IntArray | slice | None = None) -> FloatArray:
        snap = ctx.snapshot
        if rows is None:
            rows = slice(0, snap.rows)
        t, f = snap.w_vram_total[rows], snap.w_vram_free[rows]  # kept per row by the snapshot
        some = t > 0
        fill: FloatArray = np.where(some, (t - f) / np.where(some, t, 1), 0.0)
        return fill

    def column_rows(self, ctx: PlacementContext) -> SlotRows:
        """Row-local: a worker's fill reads its own VRAM totals (stamped row columns) and the model's strategy."""
        binpack = ctx.model.placement_strategy == PlacementStrategy.BINPACK

        def score(rows: IntArray) -> FloatArray:
            if not binpack:
                return np.zeros((len(rows), 1), dtype=np.float64)
            fill = 0.0 + self._fill_rows(ctx, rows)  # as score_batch: the same element-wise expressions
            result: FloatArray = (fill if MAX == 1.0 else MAX * fill)[:, None]
            return result

        return SlotRows(key=(self.name, binpack), score=score)

    def score_batch(self, ctx: PlacementContext, batch: GpuBatch) -> FloatArray:
        """Fast path: per-row sums over the GPU columns, broadcast over the row's GPUs."""
        if ctx.model.placement_strategy != PlacementStrategy.BINPACK:
            return np.zeros((ctx.snapshot.rows, 1), dtype=np.float64)
        # MAX × x / 1 is x when MAX is 1.0 (this runs every decision): only 0.0 + x, as the reference sums
        fill = 0.0 + self._fill_rows(ctx)
        result: FloatArray = (fill if MAX == 1.0 else MAX * fill)[:, None]
        return result

    def score_sets(self, ctx: PlacementContext, batch: GpuSetBatch) -> FloatArray:
        """Fast path for multi-GPU candidates (one worker each)."""
        if ctx.model.placement_strategy != PlacementStrategy.BINPACK:
            return np.zeros(len(batch), dtype=np.float64)
        result: FloatArray = MAX * (0.0 + self._fill_rows(ctx)[batch.rows]) / 1
        return result

    def score_rows(self, ctx: PlacementContext, batch: RowBatch) -> FloatArray:
        """Fast path for CPU-only candidates."""
        if ctx.model.placement_strategy != PlacementStrategy.BINPACK:
            return np.zeros(len(batch), dtype=np.float64)
        result: FloatArray = MAX * (0.0 + self._fill_rows(ctx)[batch.rows]) / 1
        return result
