"""What the fragmentation scorer's fast path keeps between decisions, so a decision costs about a binpack one.

A decision changes one or two workers, yet the measure reads every worker: learning the workload from the
1,024 most recent placements and judging every candidate against it cost ~8 ms at 1,000 workers. Three
things are kept on the snapshot (``ClusterSnapshot.memo``, dropped whenever a worker's inventory may
change) and brought up to date from what moved since the last decision:

- ``WindowCounts``: how often each replica shape occurs among the recent placements, updated from the
  keys that entered or left the window (``ClusterSnapshot.placed_window``: equal keys, equal records).
- ``SingleGpuMemo``: per worker and per workload shape, the fragment before and after each single-GPU
  claim (integers, from the same kernels as the reference path), recomputed for the rows whose stamp
  (``ClusterSnapshot.w_stamp``) or claim changed; the weighted scores are recomputed for those rows only
  while the workload stays the same, and for every row (one matrix product) when it moves.
- ``GpuSetMemo``: the same for multi-GPU candidates (one GPU set per worker), per candidate set.

Shapes are columns; a shape new to the workload adds its column for every row (rare: the workload is a
distribution over a few shapes), and columns of shapes gone from it weigh zero until the memo is rebuilt.
Weighting sums the columns in the memo's order, not the workload's; scores are rounded to 1e-9 GPU for
exactly this reason (``scores_from_increases``), and a property test holds the decisions equal to the
reference path's on random clusters and event sequences.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from shared.core.placement.scorers.fragmentation_kernels import (
    FULL_MILLI,
    BoolArray,
    FloatArray,
    IntArray,
    ReplicaShape,
    Workload,
    WorkloadArrays,
    host_backed,
    scores_from_increases,
    shape_fragments,
    single_slot_fragments,
    type_access,
)
from shared.core.placement.snapshot import CPU_UNCHECKED, ClusterSnapshot, PlacedKey

HOST_DIMS = 2  # (milli-cores, RAM bytes)
_MEMOS = 4  # memos kept per kind (one per request host claim and GPU count in use)


@dataclass
class WindowCounts:
    """Shape counts of the ``window`` most recent placements, and the workloads learned from them."""

    window: int
    keys: list[PlacedKey] = field(default_factory=list)
    shapes: dict[PlacedKey, ReplicaShape | None] = field(default_factory=dict)
    counts: Counter[ReplicaShape] = field(default_factory=Counter)
    learned: dict[tuple[ReplicaShape, float], tuple[Workload, WorkloadArrays]] = field(default_factory=dict)

    def sync(self, snap: ClusterSnapshot, shape_of: Callable[[str], ReplicaShape | None]) -> None:
        """Count the keys that entered the window and uncount those that left it."""
        keys = snap.placed_window(self.window)
        if keys == self.keys:
            return
        old, new = set(self.keys), set(keys)
        for key in old - new:
            shape = self.shapes.pop(key)
            if shape is not None:
                self.counts[shape] -= 1
                if self.counts[shape] == 0:
                    del self.counts[shape]
        for key in new - old:
            shape = self.shapes[key] = shape_of(key[1])
            if shape is not None:
                self.counts[shape] += 1
        self.keys = list(keys)
        self.learned.clear()

    def workload(self, request: ReplicaShape, host_weight: float) -> tuple[Workload, WorkloadArrays]:
        """The workload learned from the window plus the request's shape, and its arrays."""
        hit = self.learned.get((request, host_weight))
        if hit is None:
            counts = Counter(self.counts)
            counts[request] += 1
            work = Workload.from_counts(counts)
            hit = (work, work.arrays(host_dims=HOST_DIMS, host_weight=host_weight))
            if len(self.learned) >= _MEMOS:
                self.learned.clear()
            self.learned[(request, host_weight)] = hit
        return hit


def window_counts(snap: ClusterSnapshot, window: int) -> WindowCounts:
    """The snapshot's window counts for ``window`` (created on first use)."""
    memo: dict[int, WindowCounts] = snap.memo.setdefault("fragmentation.window", {})
    found = memo.get(window)
    if found is None:
        found = memo[window] = WindowCounts(window)
    return found


def free_milli(snap: ClusterSnapshot, rows: IntArray | slice, claims: IntArray | None = None) -> IntArray:
    """Free milli-GPU per slot of ``rows`` (after taking ``claims`` when given); -1 where no usable GPU."""
    total, alloc = snap.g_total[rows], snap.g_alloc[rows]
    if claims is not None:
        alloc = alloc - claims
    safe = np.where(total > 0, total, 1)
    free: IntArray = np.where(snap.g_ok[rows], np.clip(alloc * FULL_MILLI // safe, 0, FULL_MILLI), -1)
    return free


def host_free(snap: ClusterSnapshot, rows: IntArray | slice) -> IntArray:
    """(milli-cores, RAM) allocatable of ``rows``, never negative; an unreported CPU count never limits."""
    host: IntArray = np.stack([np.clip(snap.w_cpu_alloc[rows], 0, CPU_UNCHECKED),
                               np.maximum(snap.w_ram_alloc[rows], 0)], axis=1)
    return host


def products(snap: ClusterSnapshot, rows: IntArray | slice) -> list[str]:
    """The GPU product of each row (its first GPU's; "" without GPUs)."""
    names = snap.type_names()
    return [names[t][1] if t >= 0 else "" for t in snap.g_type[rows, 0].tolist()]


def _weights(shapes: list[ReplicaShape], work: Workload) -> FloatArray | None:
    """The workload's weights in the memo's column order; None if a workload shape has no column."""
    column = {s: k for k, s in enumerate(shapes)}
    w = np.zeros(len(shapes), dtype=np.float64)
    for shape, weight in zip(work.shapes, work.weights, strict=True):
        k = column.get(shape)
        if k is None:
            return None
        w[k] = weight
    return w


def _expected(frag: FloatArray, total: IntArray, backed: FloatArray | None, w: FloatArray,
              work: WorkloadArrays) -> FloatArray:
    """``expected_fragmentation`` from kept fragments (the last axis: the memo's shape columns)."""
    result: FloatArray = (frag @ w) / FULL_MILLI
    if backed is not None:
        result = result + work.host_weight * np.maximum(total / FULL_MILLI - backed, 0.0)
    return result


def _columns(shapes: list[ReplicaShape]) -> tuple[Workload, WorkloadArrays]:
    """A workload over the memo's shapes (weights unused: fragments are unweighted)."""
    work = Workload(shapes=tuple(shapes), weights=tuple(1.0 for _ in shapes))
    return work, work.arrays(host_dims=HOST_DIMS)


class SingleGpuMemo:
    """Kept fragments of every single-GPU claim, for one request host claim (CPU, RAM), on all rows."""

    def __init__(self, snap: ClusterSnapshot, claim_host: tuple[int, int], shapes: list[ReplicaShape]) -> None:
        self.layout = snap.layout
        self.claim_host = np.array(claim_host, dtype=np.int64)
        self.shapes = list(shapes)
        rows, width = snap.rows, snap.g_ok.shape[1]
        self.products = products(snap, slice(0, rows))
        self.stamp = np.full(rows, -2, dtype=np.int64)  # never a row's stamp: every row starts stale
        self.claims = np.zeros((rows, width), dtype=np.int64)
        self.free = np.zeros((rows, width), dtype=np.int64)
        self.after = np.zeros((rows, width), dtype=np.int64)
        self.host = np.zeros((rows, HOST_DIMS), dtype=np.int64)
        self.frag_before = np.zeros((rows, len(shapes)), dtype=np.float64)
        self.total_before = np.zeros(rows, dtype=np.int64)
        self.frag_after = np.zeros((rows, width, len(shapes)), dtype=np.float64)
        self.total_after = np.zeros((rows, width), dtype=np.int64)
        self.scored_for: tuple[bytes, float, bytes] | None = None  # the weighting ``scores`` were made with
        self.scores = np.zeros((rows, width), dtype=np.float64)

    def fits(self, snap: ClusterSnapshot, work: Workload) -> bool:
        """Whether this memo can serve ``work`` on the snapshot as it is now."""
        return (self.layout == snap.layout and self.stamp.shape[0] == snap.rows
                and set(work.shapes) <= set(self.shapes) and len(self.shapes) <= 2 * len(work.shapes) + 8)

    def refresh(self, snap: ClusterSnapshot, claims: IntArray) -> IntArray:
        """Recompute the rows whose state or claim moved; returns them."""
        rows = self.stamp.shape[0]
        stamp = snap.w_stamp[:rows]
        stale = stamp != self.stamp
        stale |= (claims != self.claims).any(axis=1)
        moved = np.flatnonzero(stale)
        if len(moved) == 0:
            return moved
        self.claims[moved] = claims[moved]
        free = self.free[moved] = free_milli(snap, moved)
        after = self.after[moved] = free_milli(snap, moved, claims[moved])
        host = self.host[moved] = host_free(snap, moved)
        work, arrays = _columns(self.shapes)
        access = type_access([self.products[r] for r in moved.tolist()], work)
        frag, total = shape_fragments(free, host, access, arrays)
        self.frag_before[moved], self.total_before[moved] = frag, total
        frag_a, total_a = single_slot_fragments(free, after, host - self.claim_host, access, arrays)
        self.frag_after[moved], self.total_after[moved] = frag_a, total_a
        self.stamp[moved] = stamp[moved]
        return moved

    def score(self, snap: ClusterSnapshot, claims: IntArray, work: Workload, arrays: WorkloadArrays) -> FloatArray:
        """Scores of every single-GPU claim (rows × slots) under ``work``; read-only, valid until the next call."""
        moved = self.refresh(snap, claims)
        w = _weights(self.shapes, work)
        assert w is not None  # ``fits`` checked the columns
        per_gpu = arrays.host_per_gpu
        key = (w.tobytes(), arrays.host_weight, b"" if per_gpu is None else per_gpu.tobytes())
        if self.scored_for != key or len(moved) > len(self.stamp) // 4:
            rows: IntArray | slice = slice(None)
        elif len(moved):
            rows = moved
        else:
            return self.scores
        before = _expected(self.frag_before[rows], self.total_before[rows], host_backed(self.host[rows], arrays),
                           w, arrays)
        backed_after = host_backed(self.host[rows] - self.claim_host, arrays)
        after = _expected(self.frag_after[rows], self.total_after[rows],
                          None if backed_after is None else backed_after[:, None], w, arrays)
        self.scores.flags.writeable = True
        self.scores[rows] = scores_from_increases(after - before[:, None])
        self.scores.flags.writeable = False
        self.scored_for = key
        return self.scores


def single_gpu_memo(snap: ClusterSnapshot, claim_host: tuple[int, int], work: Workload) -> SingleGpuMemo:
    """The snapshot's memo for this host claim, rebuilt when rows moved or the workload has a new shape."""
    memos: dict[tuple[int, int], SingleGpuMemo] = snap.memo.setdefault("fragmentation.single", {})
    memo = memos.get(claim_host)
    if memo is None or not memo.fits(snap, work):
        keep = [] if memo is None or memo.layout != snap.layout else [s for s in memo.shapes if s in work.shapes]
        shapes = keep + [s for s in work.shapes if s not in keep]
        if len(memos) >= _MEMOS:
            memos.clear()
        memo = memos[claim_host] = SingleGpuMemo(snap, claim_host, shapes)
    return memo


class GpuSetMemo:
    """Kept fragments of each row's multi-GPU candidate set, for one (GPU count, CPU, RAM) request."""

    def __init__(self, snap: ClusterSnapshot, width: int, claim_host: tuple[int, int],
                 shapes: list[ReplicaShape]) -> None:
        self.layout = snap.layout
        self.claim_host = np.array(claim_host, dtype=np.int64)
        self.shapes = list(shapes)
        rows = snap.rows
        self.products = products(snap, slice(0, rows))
        self.stamp = np.full(rows, -2, dtype=np.int64)
        self.slots = np.full((rows, width), -1, dtype=np.int64)
        self.claims = np.zeros((rows, width), dtype=np.int64)
        self.host = np.zeros((rows, HOST_DIMS), dtype=np.int64)
        self.frag_before = np.zeros((rows, len(shapes)), dtype=np.float64)
        self.total_before = np.zeros(rows, dtype=np.int64)
        self.frag_after = np.zeros((rows, len(shapes)), dtype=np.float64)
        self.total_after = np.zeros(rows, dtype=np.int64)

    def fits(self, snap: ClusterSnapshot, work: Workload) -> bool:
        """Whether this memo can serve ``work`` on the snapshot as it is now."""
        return (self.layout == snap.layout and self.stamp.shape[0] == snap.rows
                and set(work.shapes) <= set(self.shapes) and len(self.shapes) <= 2 * len(work.shapes) + 8)

    def score(self, snap: ClusterSnapshot, rows: IntArray, slots: IntArray, claims: IntArray, work: Workload,
              arrays: WorkloadArrays) -> FloatArray:
        """Scores of the candidate sets (row ``rows[i]`` takes ``claims[i]`` on ``slots[i]``) under ``work``."""
        stale = ((snap.w_stamp[rows] != self.stamp[rows]) | (self.slots[rows] != slots).any(axis=1)
                 | (self.claims[rows] != claims).any(axis=1))
        moved = np.flatnonzero(stale)
        if len(moved):
            r, s = rows[moved], slots[moved]
            free = free_milli(snap, r)
            total = snap.g_total[r[:, None], s]
            taken = np.clip((snap.g_alloc[r[:, None], s] - claims[moved]) * FULL_MILLI // np.where(total > 0, total, 1),
                            0, FULL_MILLI)
            after_free = free.copy()
            np.put_along_axis(after_free, s, taken, axis=1)
            host = self.host[r] = host_free(snap, r)
            col_work, col_arrays = _columns(self.shapes)
            access = type_access([self.products[x] for x in r.tolist()], col_work)
            self.frag_before[r], self.total_before[r] = shape_fragments(free, host, access, col_arrays)
            self.frag_after[r], self.total_after[r] = shape_fragments(after_free, host - self.claim_host, access,
                                                                       col_arrays)
            self.slots[r], self.claims[r], self.stamp[r] = s, claims[moved], snap.w_stamp[r]
        w = _weights(self.shapes, work)
        assert w is not None
        host_now = self.host[rows]
        after = _expected(self.frag_after[rows], self.total_after[rows],
                          host_backed(host_now - self.claim_host, arrays), w, arrays)
        before = _expected(self.frag_before[rows], self.total_before[rows], host_backed(host_now, arrays), w, arrays)
        result: FloatArray = scores_from_increases(after - before)
        return result


def gpu_set_memo(snap: ClusterSnapshot, width: int, claim_host: tuple[int, int], work: Workload) -> GpuSetMemo:
    """The snapshot's memo for this request, rebuilt when rows moved or the workload has a new shape."""
    memos: dict[tuple[int, int, int], GpuSetMemo] = snap.memo.setdefault("fragmentation.sets", {})
    key = (width, *claim_host)
    memo = memos.get(key)
    if memo is None or not memo.fits(snap, work):
        keep = [] if memo is None or memo.layout != snap.layout else [s for s in memo.shapes if s in work.shapes]
        shapes = keep + [s for s in work.shapes if s not in keep]
        if len(memos) >= _MEMOS:
            memos.clear()
        memo = memos[key] = GpuSetMemo(snap, width, claim_host, shapes)
    return memo


def first_rows_candidate(snap: ClusterSnapshot, mask: BoolArray) -> tuple[int, int] | None:
    """(row, slot) of the first single-GPU candidate in name order, then GPU index; None without any."""
    live = np.flatnonzero(mask.any(axis=1))
    if len(live) == 0:
        return None
    row = int(live[np.argmin(snap.ranks()[live])])
    slots = np.flatnonzero(mask[row])
    slot = int(slots[np.argmin(snap.g_index[row, slots])])
    return row, slot
