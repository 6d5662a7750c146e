"""binpack (max 100): fuller bins win.

Per GPU ``(ram_claim/ram_alloc × 100 × 1 + vram_claim/vram_alloc × 100 × 2) / 3``, maximum over the
candidate's GPUs; CPU-only ``ram_claim/ram_alloc × 100``; multi-worker ``(5·main + Σ subordinates)/(5 + n)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Candidate
from shared.core.placement.fitting.cpu_only import RowBatch
from shared.core.placement.fitting.multi_gpu import GpuSetBatch
from shared.core.placement.fitting.single_gpu import GpuBatch
from shared.core.placement.scorers.base import Scorer, ratio, ratio_array
from shared.core.placement.snapshot import FloatArray

MAX = 100.0
MAIN_WEIGHT = 5


def gpu_score(ram_ratio: float, vram_ratio: float) -> float:
    """One GPU's binpack score (RAM weight 1, VRAM weight 2)."""
    return (ram_ratio * 100.0 * 1.0 + vram_ratio * 100.0 * 2.0) / 3.0


def worker_score(ctx: PlacementContext, worker: str, indexes: Sequence[int], claims: Sequence[int], ram: int) -> float:
    """A worker's share of a candidate, scored against current allocatable resources."""
    snap = ctx.snapshot
    ram_ratio = ratio(ram, snap.ram_allocatable(worker))
    if not indexes:
        return min(ram_ratio * 100.0, MAX)
    pairs = zip(indexes, claims, strict=True)
    return min(max(gpu_score(ram_ratio, ratio(c, snap.gpu_allocatable(worker, i))) for i, c in pairs), MAX)


def binpack_score(ctx: PlacementContext, cand: Candidate) -> float:
    """Binpack score of one candidate."""
    main = worker_score(ctx, cand.worker, cand.gpu_indexes, cand.vram_claims, cand.ram_claim)
    if not cand.subordinates:
        return main
    subs = [worker_score(ctx, s.worker, s.gpu_indexes, s.vram_claims, s.ram_claim) for s in cand.subordinates]
    return min((MAIN_WEIGHT * main + sum(subs)) / (MAIN_WEIGHT + len(subs)), MAX)


class Binpack(Scorer):
    """Packs replicas onto the fullest GPUs that still fit them."""

    name = "binpack"
    max_score = MAX

    def score(self, ctx: PlacementContext, candidates: Sequence[Candidate]) -> list[float]:
        """Reference path."""
        return [binpack_score(ctx, c) for c in candidates]

    def score_batch(self, ctx: PlacementContext, batch: GpuBatch) -> FloatArray:
        """Fast path: the same formula over the ``[row, slot]`` columns."""
        snap = ctx.snapshot
        rows = snap.rows
        ram_ratio = ratio_array(np.full(rows, batch.ram_claim, dtype=np.int64), snap.w_ram_alloc[:rows])[:, None]
        vram_ratio = ratio_array(batch.claims, snap.g_alloc[:rows])
        result: FloatArray = np.minimum((ram_ratio * 100.0 * 1.0 + vram_ratio * 100.0 * 2.0) / 3.0, MAX)
        return result

    def score_sets(self, ctx: PlacementContext, batch: GpuSetBatch) -> FloatArray:
        """Fast path for multi-GPU candidates: the maximum GPU score of each set."""
        snap = ctx.snapshot
        ram = np.full(len(batch), batch.ram_claim, dtype=np.int64)
        ram_ratio = ratio_array(ram, snap.w_ram_alloc[batch.rows])[:, None]
        vram_ratio = ratio_array(batch.claims, snap.g_alloc[batch.rows[:, None], batch.slots])
        per_gpu = (ram_ratio * 100.0 * 1.0 + vram_ratio * 100.0 * 2.0) / 3.0
        result: FloatArray = np.minimum(per_gpu.max(axis=1), MAX)
        return result

    def score_rows(self, ctx: PlacementContext, batch: RowBatch) -> FloatArray:
        """Fast path for CPU-only candidates: ``ram_claim/ram_alloc × 100``."""
        ram = np.full(len(batch), batch.ram_claim, dtype=np.int64)
        result: FloatArray = np.minimum(ratio_array(ram, ctx.snapshot.w_ram_alloc[batch.rows]) * 100.0, MAX)
        return result
