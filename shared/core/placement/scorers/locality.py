"""locality (max 5): prefer workers that already have the model's files READY."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Candidate
from shared.core.placement.fitting.cpu_only import RowBatch
from shared.core.placement.fitting.multi_gpu import GpuSetBatch
from shared.core.placement.fitting.single_gpu import GpuBatch
from shared.core.placement.scorers.base import Scorer
from shared.core.placement.snapshot import FloatArray

MAX = 5.0


class Locality(Scorer):
    """``5 × (fraction of the candidate's workers whose model files are READY)``."""

    name = "locality"
    max_score = MAX

    def score(self, ctx: PlacementContext, candidates: Sequence[Candidate]) -> list[float]:
        """Reference path."""
        snap, source = ctx.snapshot, ctx.source
        out = []
        for cand in candidates:
            names = [cand.worker] + [s.worker for s in cand.subordinates]
            ready = sum(1 for n in names if snap.model_file_ready(source, n))
            out.append(MAX * ready / len(names))
        return out

    def score_batch(self, ctx: PlacementContext, batch: GpuBatch) -> FloatArray:
        """Fast path: one value per row, broadcast over its GPUs."""
        ready = ctx.snapshot.ready_file_rows(ctx.source).astype(np.int64)
        result: FloatArray = (MAX * ready / 1)[:, None]
        return result

    def score_sets(self, ctx: PlacementContext, batch: GpuSetBatch) -> FloatArray:
        """Fast path for multi-GPU candidates (one worker each)."""
        ready = ctx.snapshot.ready_file_rows(ctx.source)[batch.rows].astype(np.int64)
        result: FloatArray = MAX * ready / 1
        return result

    def score_rows(self, ctx: PlacementContext, batch: RowBatch) -> FloatArray:
        """Fast path for CPU-only candidates."""
        ready = ctx.snapshot.ready_file_rows(ctx.source)[batch.rows].astype(np.int64)
        result: FloatArray = MAX * ready / 1
        return result
