"""worker_balance (max 100, opt-in): spread models go to the least used worker, by its total VRAM use.

GPUStack's spread formula (``spread``, the default) counts replicas: it keeps replicas of one model apart and
away from other models' replicas, but one 4-GPU replica counts like one 1-GPU replica, so after a tour of
the demo one worker can hold 6 of 8 GPUs and the others 2 (GPUStack users report that as uneven spread).
This scorer adds ``100 × (1 − fill)``, fill being the worker's taken VRAM fraction (claims, external use,
reserve: the same measure as ``worker_fill``), mean over a multi-worker candidate's workers. Binpack models
score 0 here. Enable it in a profile (``{"name": "worker_balance", "weight": 1}``); its weight trades
balance against the replica counts of ``spread``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Candidate, PlacementStrategy
from shared.core.placement.fitting.cpu_only import RowBatch
from shared.core.placement.fitting.multi_gpu import GpuSetBatch
from shared.core.placement.fitting.single_gpu import GpuBatch
from shared.core.placement.scorers.base import Scorer
from shared.core.placement.scorers.worker_fill import worker_fill
from shared.core.placement.snapshot import FloatArray

MAX = 100.0


class WorkerBalance(Scorer):
    """Prefers the emptiest worker (total VRAM use) for spread models."""

    name = "worker_balance"
    max_score = MAX

    def score(self, ctx: PlacementContext, candidates: Sequence[Candidate]) -> list[float]:
        """Reference path."""
        if ctx.model.placement_strategy != PlacementStrategy.SPREAD:
            return [0.0 for _ in candidates]
        out = []
        for cand in candidates:
            names = [cand.worker] + [s.worker for s in cand.subordinates]
            out.append(MAX * sum(1.0 - worker_fill(ctx, n) for n in names) / len(names))
        return out

    def _room_rows(self, ctx: PlacementContext) -> FloatArray:
        snap = ctx.snapshot
        rows = snap.rows
        t, f = snap.w_vram_total[:rows], snap.w_vram_free[:rows]  # kept per row by the snapshot
        fill: FloatArray = np.where(t > 0, (t - f) / np.where(t > 0, t, 1), 0.0)
        room: FloatArray = 1.0 - fill
        return room

    def score_batch(self, ctx: PlacementContext, batch: GpuBatch) -> FloatArray:
        """Fast path: one value per row, broadcast over the row's GPUs."""
        if ctx.model.placement_strategy != PlacementStrategy.SPREAD:
            return np.zeros((ctx.snapshot.rows, 1), dtype=np.float64)
        result: FloatArray = (MAX * self._room_rows(ctx) / 1)[:, None]
        return result

    def score_sets(self, ctx: PlacementContext, batch: GpuSetBatch) -> FloatArray:
        """Fast path for multi-GPU candidates (one worker each)."""
        if ctx.model.placement_strategy != PlacementStrategy.SPREAD:
            return np.zeros(len(batch), dtype=np.float64)
        result: FloatArray = MAX * self._room_rows(ctx)[batch.rows] / 1
        return result

    def score_rows(self, ctx: PlacementContext, batch: RowBatch) -> FloatArray:
        """Fast path for CPU-only candidates."""
        if ctx.model.placement_strategy != PlacementStrategy.SPREAD:
            return np.zeros(len(batch), dtype=np.float64)
        result: FloatArray = MAX * self._room_rows(ctx)[batch.rows] / 1
        return result
