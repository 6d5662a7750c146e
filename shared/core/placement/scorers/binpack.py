"""binpack (max 100): fuller bins win.

Per GPU ``(ram_claim/ram_alloc × 100 × 1 + vram_claim/vram_alloc × 100 × 2) / 3``, maximum over the
candidate's GPUs; CPU-only ``ram_claim/ram_alloc × 100``; multi-worker ``(5·main + Σ subordinates)/(5 + n)``.
That is GPUStack's formula, and what a model naming ``binpack`` gets. A profile may configure the scorer
with ``cpu_weight > 0`` to weigh the CPU ratio in as well (``(ram·1 + cpu·c + vram·2) / (3 + c)``), so a
worker whose CPU the replica would nearly exhaust counts as fuller.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import msgspec
import numpy as np

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Candidate
from shared.core.placement.fitting.cpu_only import RowBatch
from shared.core.placement.fitting.multi_gpu import GpuSetBatch
from shared.core.placement.fitting.single_gpu import GpuBatch
from shared.core.placement.scorers.base import Scorer, SlotRows, ratio, ratio_array
from shared.core.placement.scorers.binpack_memo import row_scores
from shared.core.placement.snapshot import ClusterSnapshot, FloatArray, IntArray

MAX = 100.0
MAIN_WEIGHT = 5


class BinpackArgs(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Parameters of binpack; the default is GPUStack's formula exactly."""

    cpu_weight: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] = 0.0


def _cpu_term(score: FloatArray | float, cpu_ratio: FloatArray | float, weight: float) -> FloatArray | float:
    """Blend the CPU ratio into a (ram·1 + vram·2)/3 score: ``(3·score + cpu·100·w) / (3 + w)``."""
    return (score * 3.0 + cpu_ratio * 100.0 * weight) / (3.0 + weight)


def gpu_score(ram_ratio: float, vram_ratio: float) -> float:
    """One GPU's binpack score (RAM weight 1, VRAM weight 2)."""
    return (ram_ratio * 100.0 * 1.0 + vram_ratio * 100.0 * 2.0) / 3.0


def worker_score(ctx: PlacementContext, worker: str, indexes: Sequence[int], claims: Sequence[int], ram: int,
                 cpu: int = 0, cpu_weight: float = 0.0) -> float:
    """A worker's share of a candidate, scored against current allocatable resources."""
    snap = ctx.snapshot
    ram_ratio = ratio(ram, snap.ram_allocatable(worker))
    if not indexes:
        score = ram_ratio * 100.0
    else:
        pairs = zip(indexes, claims, strict=True)
        score = max(gpu_score(ram_ratio, ratio(c, snap.gpu_allocatable(worker, i))) for i, c in pairs)
    if cpu_weight > 0:
        score = float(_cpu_term(score, ratio(cpu, snap.cpu_allocatable(worker)), cpu_weight))
    return min(score, MAX)


def binpack_score(ctx: PlacementContext, cand: Candidate, cpu_weight: float = 0.0) -> float:
    """Binpack score of one candidate."""
    main = worker_score(ctx, cand.worker, cand.gpu_indexes, cand.vram_claims, cand.ram_claim, cand.cpu_claim,
                        cpu_weight)
    if not cand.subordinates:
        return main
    subs = [worker_score(ctx, s.worker, s.gpu_indexes, s.vram_claims, s.ram_claim, s.cpu_claim, cpu_weight)
            for s in cand.subordinates]
    return min((MAIN_WEIGHT * main + sum(subs)) / (MAIN_WEIGHT + len(subs)), MAX)


_FEW_ROWS = 2  # the rows a decision moves (its worker, perhaps a replaced one) are rescored in Python floats


def _ratio_of(claim: int, allocatable: int) -> float:
    """``ratio_array`` for one element: the int64 operands converted to doubles, then divided, as numpy does
    (``ratio`` divides the Python ints exactly, which differs past 2**53)."""
    if claim <= 0:
        return 0.0
    if allocatable <= 0:
        return 1.0
    return float(claim) / float(allocatable)


def _few_rows(snap: ClusterSnapshot, rows: IntArray, claims: IntArray, ram: int) -> FloatArray:
    """``score_batch``'s per-slot formula (without the CPU term) over a few rows, element by element: the same
    IEEE double operations in the same order as the array expression, so the same bits, without the dozen
    numpy calls that cost more than the arithmetic on a handful of GPUs."""
    out = [_row_values(snap, r, row_claims, ram) for r, row_claims in zip(rows.tolist(), claims.tolist(), strict=True)]
    return np.array(out, dtype=np.float64).reshape(len(rows), claims.shape[1])


def _row_values(snap: ClusterSnapshot, r: int, claims: list[int], ram: int) -> list[float]:
    """One row of ``_few_rows``, as Python floats."""
    ram_ratio = _ratio_of(ram, int(snap.w_ram_alloc[r]))
    allocs = snap.g_alloc[r].tolist()
    return [min(gpu_score(ram_ratio, _ratio_of(c, a)), MAX) for c, a in zip(claims, allocs, strict=True)]


class Binpack(Scorer):
    """Packs replicas onto the fullest GPUs that still fit them."""

    name = "binpack"
    max_score = MAX
    Args = BinpackArgs

    @property
    def cpu_weight(self) -> float:
        """The CPU ratio's weight (0: GPUStack's formula)."""
        assert isinstance(self.args, BinpackArgs)
        return self.args.cpu_weight

    def _with_cpu(self, score: FloatArray, cpu_claim: int, alloc: IntArray) -> FloatArray:
        w = self.cpu_weight
        if w <= 0:
            return score
        cpu_ratio = ratio_array(np.full(len(alloc), cpu_claim, dtype=np.int64), alloc)
        if score.ndim == 2:
            cpu_ratio = cpu_ratio[:, None]
        blended: FloatArray = np.asarray(_cpu_term(score, cpu_ratio, w), dtype=np.float64)
        return blended

    def score(self, ctx: PlacementContext, candidates: Sequence[Candidate]) -> list[float]:
        """Reference path."""
        return [binpack_score(ctx, c, self.cpu_weight) for c in candidates]

    def _rows(self, snap: ClusterSnapshot, rows: IntArray | slice, claims: IntArray, ram: int, cpu: int) -> FloatArray:
        """The per-slot formula over the given rows (``claims``: those rows' claims): element-wise, so any
        subset of rows gets each element's value to the bit."""
        if not isinstance(rows, slice) and len(rows) <= _FEW_ROWS and self.cpu_weight <= 0:
            return _few_rows(snap, rows, claims, ram)
        ram_alloc = snap.w_ram_alloc[rows]
        ram_ratio = ratio_array(np.full(len(ram_alloc), ram, dtype=np.int64), ram_alloc)[:, None]
        vram_ratio = ratio_array(claims, snap.g_alloc[rows])
        per_slot = self._with_cpu((ram_ratio * 100.0 * 1.0 + vram_ratio * 100.0 * 2.0) / 3.0, cpu,
                                  snap.w_cpu_alloc[rows])
        result: FloatArray = np.minimum(per_slot, MAX)
        return result

    def score_batch(self, ctx: PlacementContext, batch: GpuBatch) -> FloatArray:
        """Fast path: the same formula over the ``[row, slot]`` columns (rows that did not move since the last
        decision keep their scores: ``binpack_memo``)."""
        snap = ctx.snapshot
        ram, cpu = batch.ram_claim, batch.cpu_claim

        def score(rows: IntArray | slice, claims: IntArray) -> FloatArray:
            return self._rows(snap, rows, claims, ram, cpu)

        return row_scores(snap, batch.claims, (ram, cpu, self.cpu_weight), score)

    def slot_rows(self, ctx: PlacementContext, claims: IntArray, ram_claim: int, cpu_claim: int) -> SlotRows:
        """Row-local: a GPU's score reads its worker's allocatable RAM and CPU, its own allocatable VRAM (all
        stamped row columns) and the claims."""
        snap = ctx.snapshot

        def score(rows: IntArray) -> FloatArray:
            return self._rows(snap, rows, claims[rows], ram_claim, cpu_claim)

        def one(row: int) -> list[float]:
            return _row_values(snap, row, claims[row].tolist(), ram_claim)

        return SlotRows(key=(self.name, ram_claim, cpu_claim, self.cpu_weight), score=score,
                        score_row=one if self.cpu_weight <= 0 else None)

    def score_sets(self, ctx: PlacementContext, batch: GpuSetBatch) -> FloatArray:
        """Fast path for multi-GPU candidates: the maximum GPU score of each set."""
        snap = ctx.snapshot
        ram = np.full(len(batch), batch.ram_claim, dtype=np.int64)
        ram_ratio = ratio_array(ram, snap.w_ram_alloc[batch.rows])[:, None]
        vram_ratio = ratio_array(batch.claims, snap.g_alloc[batch.rows[:, None], batch.slots])
        per_gpu = (ram_ratio * 100.0 * 1.0 + vram_ratio * 100.0 * 2.0) / 3.0
        best = self._with_cpu(per_gpu.max(axis=1), batch.cpu_claim, snap.w_cpu_alloc[batch.rows])
        result: FloatArray = np.minimum(best, MAX)
        return result

    def score_rows(self, ctx: PlacementContext, batch: RowBatch) -> FloatArray:
        """Fast path for CPU-only candidates: ``ram_claim/ram_alloc × 100``."""
        ram = np.full(len(batch), batch.ram_claim, dtype=np.int64)
        score = self._with_cpu(ratio_array(ram, ctx.snapshot.w_ram_alloc[batch.rows]) * 100.0, batch.cpu_claim,
                               ctx.snapshot.w_cpu_alloc[batch.rows])
        result: FloatArray = np.minimum(score, MAX)
        return result
