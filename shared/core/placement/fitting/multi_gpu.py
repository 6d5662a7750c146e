"""multi_gpu: one worker, several GPUs of one type; only the candidates with the fewest GPUs are kept."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared.core.placement.context import PlacementContext, gpu_type_matches
from shared.core.placement.domain import Candidate
from shared.core.placement.fitting.base import (
    FitOutcome,
    FitStrategy,
    by_allocatable,
    candidate,
    full_claims,
    host_rows,
    host_short,
    qualifies,
    type_groups,
)
from shared.core.placement.requirements import ceil_div, tp_divisible
from shared.core.placement.snapshot import BoolArray, IntArray, WorkerView


class MultiGpu(FitStrategy):
    """Takes qualifying GPUs by allocatable VRAM, largest first, until V is covered at a valid TP size."""

    name = "multi_gpu"

    def skip(self, ctx: PlacementContext) -> str | None:
        """Not when exactly one GPU is asked for."""
        if ctx.req.gpu_count == 1:
            return "the parallel sizes ask for 1 GPU"
        return None

    def sizes(self, ctx: PlacementContext, available: int) -> list[int]:
        """GPU counts to try, smallest first: the world size if given, else valid tensor-parallel sizes."""
        count = ctx.req.gpu_count
        if count is not None:
            return [count] if count <= available else []
        return [n for n in range(1, available + 1) if tp_divisible(n, ctx.req)]

    def fit(self, ctx: PlacementContext, workers: Sequence[WorkerView]) -> FitOutcome:
        """Per worker and GPU type, the first (smallest) GPU set that holds the replica."""
        out = FitOutcome()
        ram = ctx.req.ram
        found: list[Candidate] = []
        for view in workers:
            if host_short(ctx, view, ram):
                continue
            for group in type_groups(ctx, view):
                ordered = by_allocatable([g for g in group if qualifies(ctx, g)])
                for n in self.sizes(ctx, len(ordered)):
                    claims = full_claims(ctx, ordered[:n])
                    if claims is not None:
                        found.append(candidate(view.name, ordered[:n], claims, ram, self.name, cpu=ctx.req.cpu))
                        break
        if found:
            fewest = min(len(c.gpu_indexes) for c in found)
            out.candidates = [c for c in found if len(c.gpu_indexes) == fewest]
        return out

    def fit_batch(self, ctx: PlacementContext, survivors: BoolArray) -> GpuSetBatch | None:
        """Fast path (see ``fit_gpu_sets``)."""
        return fit_gpu_sets(self, ctx, survivors)


@dataclass
class GpuSetBatch:
    """Single-worker multi-GPU candidates as columns: one row per candidate worker, ``n`` GPUs each.

    ``slots`` and ``indexes`` are in ascending GPU-index order (as in a Candidate); ``claims`` parallel.
    """

    rows: IntArray
    slots: IntArray
    indexes: IntArray
    claims: IntArray
    ram_claim: int
    cpu_claim: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        """GPUs per candidate."""
        return int(self.slots.shape[1])


def fit_gpu_sets(strategy: MultiGpu, ctx: PlacementContext, survivors: BoolArray) -> GpuSetBatch | None:
    """The multi_gpu strategy over the snapshot's columns; None when the reference path is needed.

    Per worker, qualifying GPUs are sorted by allocatable VRAM (descending, then index) and the smallest
    valid GPU count whose claims cover V is taken; only the candidates with the fewest GPUs are kept.
    Workers whose eligible GPUs mix types, and GPU-label selectors, go to the reference path.
    """
    selector = ctx.model.gpu_selector
    if selector is not None and selector.labels:
        return None
    snap, req = ctx.snapshot, ctx.req
    if req.gguf is not None and req.gpu_memory_utilization == 0:
        return None  # proportional tensor split: the reference path sizes it
    rows = snap.rows
    width = snap.g_ok.shape[1]
    workers_ok = host_rows(ctx, survivors)
    eligible = snap.g_ok[:rows] & workers_ok[:, None]
    types = snap.g_type[:rows]
    if selector is not None and selector.gpu_type:
        wanted = selector.gpu_type
        eligible &= np.isin(types, [c for c, (v, p) in enumerate(snap.type_names()) if gpu_type_matches(wanted, v, p)])
    big = np.iinfo(np.int64).max
    lo = np.where(eligible, types, big).min(axis=1)
    hi = np.where(eligible, types, -1).max(axis=1)
    if bool((eligible.any(axis=1) & (lo != hi)).any()):
        return None
    alloc = snap.g_alloc[:rows]
    index = snap.g_index[:rows]
    if width > 256 or (rows and int(index.max()) >= 256) or (rows and int(np.abs(alloc).max()) >= 1 << 46):
        return None  # outside the composite sort key's range
    u = req.gpu_memory_utilization
    if u > 0:
        claim = snap.claim_column(u)
        qual = eligible & (alloc >= claim)
    else:
        claim = alloc
        qual = eligible & (alloc > 0)
    # One sort orders every worker's qualifying GPUs by allocatable VRAM (descending), then GPU index;
    # the key carries the index and the slot in its low bits.
    slot_ids = np.arange(width, dtype=np.int64)[None, :]
    ordered = np.sort(np.where(qual, -alloc * 65536 + index * 256 + slot_ids, big), axis=1)
    valid = ordered != big
    sorted_slot = np.where(valid, ordered & 0xFF, 0)
    sorted_alloc = np.where(valid, -(ordered >> 16), 0)
    count = valid.sum(axis=1)
    all_rows = np.arange(rows, dtype=np.int64)[:, None]
    csum = np.cumsum(np.where(valid, claim[all_rows, sorted_slot], 0), axis=1)
    found = np.zeros(rows, dtype=np.int64)
    for n in strategy.sizes(ctx, width):
        if u > 0:
            ok = (count >= n) & (csum[:, n - 1] >= req.vram)
        else:
            ok = (count >= n) & (sorted_alloc[:, n - 1] >= ceil_div(req.vram, n))
        found = np.where((found == 0) & ok, n, found)
    cand = np.flatnonzero(found > 0)
    if len(cand) == 0:
        empty = np.zeros((0, 0), dtype=np.int64)
        return GpuSetBatch(rows=cand.astype(np.int64), slots=empty, indexes=empty, claims=empty, ram_claim=req.ram,
                           cpu_claim=req.cpu)
    fewest = int(found[cand].min())
    cand = cand[found[cand] == fewest]
    chosen = np.sort(ordered[cand, :fewest] & 0xFFFF, axis=1)  # (index, slot) pairs in GPU-index order
    slots = chosen & 0xFF
    idx = chosen >> 8
    even = np.full(slots.shape, ceil_div(req.vram, fewest), dtype=np.int64)
    claims = claim[cand[:, None], slots] if u > 0 else even
    return GpuSetBatch(rows=cand.astype(np.int64), slots=slots, indexes=idx, claims=claims, ram_claim=req.ram,
                       cpu_claim=req.cpu)
