"""spread (max 100): replicas of one model on different workers and GPUs, away from other models.

Worker score W from this model's (``current``) and other models' (``others``) instance counts, with
``inv`` normalised over the candidate workers; GPU score G = mean of ``1/(1 + current + 0.2·others)``;
score ``100 × (0.85·W + 0.15·G)`` (CPU-only: ``100 × W``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Candidate
from shared.core.placement.fitting.cpu_only import RowBatch
from shared.core.placement.fitting.multi_gpu import GpuSetBatch
from shared.core.placement.fitting.single_gpu import GpuBatch
from shared.core.placement.scorers.base import Scorer, inv, inv_array
from shared.core.placement.snapshot import BoolArray, FloatArray, IntArray

MAX = 100.0


def worker_factor(current: float, others: float, any_empty: bool, c_range: tuple[int, int],
                  o_range: tuple[int, int]) -> float:
    """W for one worker (see the module docstring for the three cases)."""
    inv_c = inv(current, *c_range)
    inv_o = inv(others, *o_range)
    if any_empty and current == 0:
        return 0.85 + 0.15 * inv_o
    if any_empty:
        return 0.45 + 0.35 * inv_c + 0.20 * inv_o
    return 0.50 + 0.25 * inv_c + 0.15 * inv_o


def gpu_factor(current: int, others: int) -> float:
    """One GPU's share of G."""
    return 1.0 / (1.0 + current + 0.2 * others)


class Spread(Scorer):
    """Prefers workers and GPUs with the fewest replicas of this model, then of other models."""

    name = "spread"
    max_score = MAX

    def score(self, ctx: PlacementContext, candidates: Sequence[Candidate]) -> list[float]:
        """Reference path."""
        snap, model = ctx.snapshot, ctx.model.name
        counts = {c.worker: snap.worker_counts(model, c.worker) for c in candidates}
        if not counts:
            return []
        cur = [v[0] for v in counts.values()]
        oth = [v[1] for v in counts.values()]
        any_empty = min(cur) == 0
        c_range, o_range = (min(cur), max(cur)), (min(oth), max(oth))
        out = []
        for cand in candidates:
            current, others = counts[cand.worker]
            w = worker_factor(current, others, any_empty, c_range, o_range)
            gpus = [(cand.worker, i) for i in cand.gpu_indexes]
            gpus += [(s.worker, i) for s in cand.subordinates for i in s.gpu_indexes]
            if not gpus:
                out.append(100.0 * w)
                continue
            g = sum(gpu_factor(*snap.gpu_counts(model, name, i)) for name, i in gpus) / len(gpus)
            out.append(100.0 * (0.85 * w + 0.15 * g))
        return out

    def _worker_factors(self, ctx: PlacementContext, in_batch: BoolArray) -> tuple[FloatArray, IntArray]:
        """W for every row, normalised over the candidate rows, and this model's per-GPU counts."""
        snap = ctx.snapshot
        rows = snap.rows
        cur_w, cur_g = snap.model_count_columns(ctx.model.name)
        oth_w = snap.w_instances[:rows] - cur_w
        cw, ow = cur_w[in_batch], oth_w[in_batch]
        c_lo, c_hi, o_lo, o_hi = int(cw.min()), int(cw.max()), int(ow.min()), int(ow.max())
        inv_c = inv_array(cur_w, c_lo, c_hi)
        inv_o = inv_array(oth_w, o_lo, o_hi)
        if c_lo == 0:
            w: FloatArray = np.where(cur_w == 0, 0.85 + 0.15 * inv_o, 0.45 + 0.35 * inv_c + 0.20 * inv_o)
        else:
            w = 0.50 + 0.25 * inv_c + 0.15 * inv_o
        return w, cur_g

    def score_batch(self, ctx: PlacementContext, batch: GpuBatch) -> FloatArray:
        """Fast path: W per row, G per [row, slot], the same expressions elementwise."""
        snap = ctx.snapshot
        if len(batch) == 0:
            return np.zeros(batch.mask.shape, dtype=np.float64)
        w, cur_g = self._worker_factors(ctx, batch.worker_mask())
        g_oth = snap.g_instances[: snap.rows] - cur_g
        g = 1.0 / (1.0 + cur_g + 0.2 * g_oth)  # the mean over one GPU: x / 1 is x, bit for bit
        result: FloatArray = 100.0 * (0.85 * w[:, None] + 0.15 * g)
        return result

    def score_sets(self, ctx: PlacementContext, batch: GpuSetBatch) -> FloatArray:
        """Fast path for multi-GPU candidates: G is the mean over the set, summed in GPU-index order."""
        snap = ctx.snapshot
        if len(batch) == 0:
            return np.zeros(0, dtype=np.float64)
        in_batch = np.zeros(snap.rows, dtype=np.bool_)
        in_batch[batch.rows] = True
        w, cur_g = self._worker_factors(ctx, in_batch)
        rows = batch.rows[:, None]
        current = cur_g[rows, batch.slots]
        others = snap.g_instances[rows, batch.slots] - current
        factors = 1.0 / (1.0 + current + 0.2 * others)
        total = np.zeros(len(batch), dtype=np.float64)
        for k in range(batch.width):  # sequential, as Python's sum() adds them in the reference path
            total = total + factors[:, k]
        g = total / batch.width
        result: FloatArray = 100.0 * (0.85 * w[batch.rows] + 0.15 * g)
        return result

    def score_rows(self, ctx: PlacementContext, batch: RowBatch) -> FloatArray:
        """Fast path for CPU-only candidates: ``100 × W``."""
        if len(batch) == 0:
            return np.zeros(0, dtype=np.float64)
        in_batch = np.zeros(ctx.snapshot.rows, dtype=np.bool_)
        in_batch[batch.rows] = True
        w, _ = self._worker_factors(ctx, in_batch)
        result: FloatArray = 100.0 * w[batch.rows]
        return result
