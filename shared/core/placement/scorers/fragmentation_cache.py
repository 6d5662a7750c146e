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

Shapes are columns. A shape new to the workload rebuilds the memo (every row once: rare, the workload is a
distribution over a few shapes); columns of shapes gone from it weigh zero until too many of them do. A
row whose raw inputs (allocatable VRAM, CPU, RAM, claims) are back to what was kept keeps its fragments.
Weighting sums the columns in the memo's order, not the workload's; scores are rounded to 1e-9 GPU for
exactly this reason (``scores_from_increases``), and property tests hold the decisions equal to the
reference path's on random clusters and event sequences (tests/unit/placement/test_fragmentation_memo.py).
"""

from __future__ import annotations

from bisect import bisect_left
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
_LARGE = 32 << 20  # bytes of one memo's largest array from which it is the only memo of its kind kept


@dataclass
class WindowCounts:
    """Shape counts of the ``window`` most recent placements, and the workloads learned from them."""

    window: int
    keys: list[PlacedKey] = field(default_factory=list)
    shapes: dict[PlacedKey, ReplicaShape | None] = field(default_factory=dict)
    counts: Counter[ReplicaShape] = field(default_factory=Counter)
    learned: dict[tuple[int, int, tuple[int, int], float], tuple[Workload, WorkloadArrays]] = field(
        default_factory=dict)

    def sync(self, snap: ClusterSnapshot, shape_of: Callable[[str], ReplicaShape | None]) -> None:
        """Count the keys that entered the window and uncount those that left it."""
        keys = snap.placed_window(self.window)
        if keys == self.keys:
            return
        left, came = window_change(self.keys, keys)
        delta: Counter[ReplicaShape] = Counter()
        for key in left:
            shape = self.shapes.pop(key)
            if shape is not None:
                delta[shape] -= 1
        for key in came:
            shape = self.shapes[key] = shape_of(key[1])
            if shape is not None:
                delta[shape] += 1
        self.keys = list(keys)
        for shape, change in delta.items():
            if change:
                self.learned.clear()  # the distribution moved (not when a shape left and an equal one came)
                self.counts[shape] += change
                if self.counts[shape] == 0:
                    del self.counts[shape]

    def workload(self, gpus: int, milli: int, host: tuple[int, int], host_weight: float
                 ) -> tuple[Workload, WorkloadArrays]:
        """The workload learned from the window plus the request's shape, and its arrays."""
        key = (gpus, milli, host, host_weight)  # plain values: hashed in C, unlike a ReplicaShape
        hit = self.learned.get(key)
        if hit is None:
            counts = Counter(self.counts)
            counts[ReplicaShape(gpus=gpus, milli=milli, host=host)] += 1
            work = Workload.from_counts(counts)
            hit = (work, work.arrays(host_dims=HOST_DIMS, host_weight=host_weight))
            if len(self.learned) >= _MEMOS:
                self.learned.clear()
            self.learned[key] = hit
        return hit


def window_change(old: list[PlacedKey], new: list[PlacedKey]) -> tuple[list[PlacedKey], list[PlacedKey]]:
    """(keys that left, keys that came) between two sorted windows of distinct keys.

    A window that only slid (the oldest left, the newest came: every placement in a busy cluster) is
    recognised with one binary search and one list comparison; anything else goes through sets.
    """
    if old and new:
        i = bisect_left(old, new[0])  # old[:i] are older than all of new
        kept = len(old) - i
        if kept <= len(new) and old[i:] == new[:kept]:
            return old[:i], new[kept:]
    old_set, new_set = set(old), set(new)
    return [k for k in old if k not in new_set], [k for k in new if k not in old_set]


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
    milli = np.minimum(np.maximum(alloc * FULL_MILLI // safe, 0), FULL_MILLI)  # np.clip, without its overhead
    free: IntArray = np.where(snap.g_ok[rows], milli, -1)
    return free


def host_free(snap: ClusterSnapshot, rows: IntArray | slice) -> IntArray:
    """(milli-cores, RAM) allocatable of ``rows``, never negative; an unreported CPU count never limits."""
    cpu = snap.w_cpu_alloc[rows]
    host: IntArray = np.empty((len(cpu), HOST_DIMS), dtype=np.int64)
    host[:, 0] = np.minimum(np.maximum(cpu, 0), CPU_UNCHECKED)
    host[:, 1] = np.maximum(snap.w_ram_alloc[rows], 0)
    return host


def products(snap: ClusterSnapshot, rows: IntArray | slice) -> list[str]:
    """The GPU product of each row (its first GPU's; "" without GPUs)."""
    names = snap.type_names()
    return [names[t][1] if t >= 0 else "" for t in snap.g_type[rows, 0].tolist()]


def _expected(frag: FloatArray, total: IntArray, backed: FloatArray | None, w: FloatArray,
              work: WorkloadArrays) -> FloatArray:
    """``expected_fragmentation`` from kept fragments (the last axis: the memo's shape columns)."""
    result: FloatArray = (frag @ w) / FULL_MILLI
    if backed is not None:
        result = result + work.host_weight * np.maximum(total / FULL_MILLI - backed, 0.0)
    return result


ClaimsToken = tuple[str, object]


def _claims_token(claims: IntArray) -> ClaimsToken | None:
    """What identifies a claim matrix without reading it: its value when it is one value broadcast, the
    object itself when read-only (the snapshot's claim columns are); None when it must be compared."""
    if claims.size and not any(claims.strides):
        return ("value", int(claims.flat[0]))
    if not claims.flags.writeable and claims.base is None:
        return ("array", claims)
    return None


def _same_claims(a: ClaimsToken | None, b: ClaimsToken | None) -> bool:
    if a is None or b is None or a[0] != b[0]:
        return False
    return a[1] is b[1] if a[0] == "array" else a[1] == b[1]


class Columns:
    """A memo's shape columns: a workload over them (weights unused: fragments are unweighted), and the
    weights of the last workload served in column order."""

    def __init__(self, shapes: list[ReplicaShape]) -> None:
        self.index = {s: k for k, s in enumerate(shapes)}
        self.work = Workload(shapes=tuple(shapes), weights=tuple(1.0 for _ in shapes))
        self.arrays = self.work.arrays(host_dims=HOST_DIMS)
        self._served: tuple[Workload, FloatArray | None] | None = None

    def weights_for(self, work: Workload) -> FloatArray | None:
        """``work``'s weights in column order; None if a shape of it has no column, or too many columns
        are of shapes gone from the workload (then the memo is rebuilt)."""
        if self._served is not None and self._served[0] is work:
            return self._served[1]
        w: FloatArray | None = np.zeros(len(self.index), dtype=np.float64)
        for shape, weight in zip(work.shapes, work.weights, strict=True):
            k = self.index.get(shape)
            if k is None or len(self.index) > 2 * len(work.shapes) + 8:
                w = None
                break
            w[k] = weight  # type: ignore[index]
        self._served = (work, w)
        return w


class SingleGpuMemo:
    """Kept fragments of every single-GPU claim, for one request host claim (CPU, RAM), on all rows."""

    def __init__(self, snap: ClusterSnapshot, claim_host: tuple[int, int], shapes: list[ReplicaShape]) -> None:
        self.layout = snap.layout
        self.claim_host = np.array(claim_host, dtype=np.int64)
        self.shapes = list(shapes)
        self.columns = Columns(shapes)
        rows, width = snap.rows, snap.g_ok.shape[1]
        self.products = products(snap, slice(0, rows))
        self.stamp = np.full(rows, -2, dtype=np.int64)  # never a row's stamp: every row starts stale
        # the raw inputs of each row's fragments, as last computed (every row is computed on the first use)
        self.built = False
        self.claims_token: ClaimsToken | None = None  # what ``claims`` was last compared with
        self.claims = np.zeros((rows, width), dtype=np.int64)
        self.alloc = np.zeros((rows, width), dtype=np.int64)
        self.cpu = np.zeros(rows, dtype=np.int64)
        self.ram = np.zeros(rows, dtype=np.int64)
        self.host = np.zeros((rows, HOST_DIMS), dtype=np.int64)
        self.frag_before = np.zeros((rows, len(shapes)), dtype=np.float64)
        self.total_before = np.zeros(rows, dtype=np.int64)
        self.frag_after = np.zeros((rows, width, len(shapes)), dtype=np.float64)
        self.total_after = np.zeros((rows, width), dtype=np.int64)
        self.scored_for: tuple[bytes, float, bytes] | None = None  # the weighting ``scores`` were made with
        self.scored_with: tuple[FloatArray, WorkloadArrays] | None = None  # the objects that carried it
        self.scores = np.zeros((rows, width), dtype=np.float64)

    def fits(self, snap: ClusterSnapshot, work: Workload) -> bool:
        """Whether this memo can serve ``work`` on the snapshot as it is now."""
        return (self.layout == snap.layout and self.stamp.shape[0] == snap.rows
                and self.columns.weights_for(work) is not None)

    def refresh(self, snap: ClusterSnapshot, claims: IntArray) -> IntArray:
        """Recompute the rows whose state or claim moved; returns those whose inputs changed."""
        rows = self.stamp.shape[0]
        stamp = snap.w_stamp[:rows]
        moved = np.flatnonzero(stamp != self.stamp)
        token = _claims_token(claims)
        if not _same_claims(token, self.claims_token):
            other_claims = claims != self.claims
            if other_claims.any():  # (a flat test: a per-row reduction costs more than the rest of a decision)
                moved = np.union1d(moved, np.flatnonzero(rows_any(other_claims)))
            self.claims_token = token
        if len(moved) == 0:
            return moved
        self.stamp[moved] = stamp[moved]
        # A row whose usage and claim are as kept (a replica placed and gone again, a usage report that
        # moved nothing) keeps its fragments; GPU totals and flags change only with the inventory, which
        # drops the memo.
        alloc, cpu, ram = snap.g_alloc[moved], snap.w_cpu_alloc[moved], snap.w_ram_alloc[moved]
        row_claims = claims[moved]
        changed = ((alloc != self.alloc[moved]).any(axis=1) | (row_claims != self.claims[moved]).any(axis=1)
                   | (cpu != self.cpu[moved]) | (ram != self.ram[moved]))
        if self.built and not changed.all():
            moved, alloc, cpu, ram, row_claims = (moved[changed], alloc[changed], cpu[changed], ram[changed],
                                                  row_claims[changed])
            if len(moved) == 0:
                return np.zeros(0, dtype=np.int64)
        self.alloc[moved], self.cpu[moved], self.ram[moved], self.claims[moved] = alloc, cpu, ram, row_claims
        free = free_milli(snap, moved)
        after = free_milli(snap, moved, row_claims)
        host = host_free(snap, moved)
        self.host[moved] = host
        self.built = True
        work, arrays = self.columns.work, self.columns.arrays
        access = type_access([self.products[r] for r in moved.tolist()], work)
        frag, total = shape_fragments(free, host, access, arrays)
        self.frag_before[moved], self.total_before[moved] = frag, total
        frag_a, total_a = single_slot_fragments(free, after, host - self.claim_host, access, arrays)
        self.frag_after[moved], self.total_after[moved] = frag_a, total_a
        return moved

    def score(self, snap: ClusterSnapshot, claims: IntArray, work: Workload, arrays: WorkloadArrays) -> FloatArray:
        """Scores of every single-GPU claim (rows × slots) under ``work``; read-only, valid until the next call."""
        moved = self.refresh(snap, claims)
        w = self.columns.weights_for(work)
        assert w is not None  # ``fits`` checked the columns
        if self.scored_with is None or self.scored_with[0] is not w or self.scored_with[1] is not arrays:
            key = _scoring_key(w, arrays)
            if key != self.scored_for:
                moved = np.arange(len(self.stamp), dtype=np.int64)
            self.scored_for, self.scored_with = key, (w, arrays)
        if len(moved) > len(self.stamp) // 4:
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
        return self.scores


def single_gpu_memo(snap: ClusterSnapshot, claim_host: tuple[int, int], work: Workload) -> SingleGpuMemo:
    """The snapshot's memo for this host claim, rebuilt when rows moved or the workload has a new shape."""
    memos: dict[tuple[int, int], SingleGpuMemo] = snap.memo.setdefault("fragmentation.single", {})
    memo = memos.get(claim_host)
    if memo is None or not memo.fits(snap, work):
        keep = [] if memo is None or memo.layout != snap.layout else [s for s in memo.shapes if s in work.shapes]
        shapes = keep + [s for s in work.shapes if s not in keep]
        if len(memos) >= _MEMOS or _large(snap, shapes):
            memos.clear()
        memo = memos[claim_host] = SingleGpuMemo(snap, claim_host, shapes)
    return memo


class GpuSetMemo:
    """Kept fragments and scores of each row's multi-GPU candidate set, for one (GPU count, CPU, RAM) request."""

    def __init__(self, snap: ClusterSnapshot, width: int, claim_host: tuple[int, int],
                 shapes: list[ReplicaShape]) -> None:
        self.layout = snap.layout
        self.claim_host = np.array(claim_host, dtype=np.int64)
        self.shapes = list(shapes)
        self.columns = Columns(shapes)
        rows = snap.rows
        self.products = products(snap, slice(0, rows))
        self.stamp = np.full(rows, -2, dtype=np.int64)
        # the raw inputs of each row's fragments, as last computed (slot -1: never computed)
        self.slots = np.full((rows, width), -1, dtype=np.int64)
        self.claims = np.zeros((rows, width), dtype=np.int64)
        self.alloc = np.zeros((rows, snap.g_ok.shape[1]), dtype=np.int64)
        self.cpu = np.zeros(rows, dtype=np.int64)
        self.ram = np.zeros(rows, dtype=np.int64)
        self.host = np.zeros((rows, HOST_DIMS), dtype=np.int64)
        self.frag_before = np.zeros((rows, len(shapes)), dtype=np.float64)
        self.total_before = np.zeros(rows, dtype=np.int64)
        self.frag_after = np.zeros((rows, len(shapes)), dtype=np.float64)
        self.total_after = np.zeros(rows, dtype=np.int64)
        self.scores = np.zeros(rows, dtype=np.float64)
        self.scored = np.zeros(rows, dtype=np.bool_)  # ``scores`` holds the row's score under ``scored_for``
        self.scored_for: tuple[bytes, float, bytes] | None = None
        self.scored_with: tuple[FloatArray, WorkloadArrays] | None = None

    def fits(self, snap: ClusterSnapshot, work: Workload) -> bool:
        """Whether this memo can serve ``work`` on the snapshot as it is now."""
        return (self.layout == snap.layout and self.stamp.shape[0] == snap.rows
                and self.columns.weights_for(work) is not None)

    def _refresh(self, snap: ClusterSnapshot, rows: IntArray, slots: IntArray, claims: IntArray) -> None:
        """Recompute the fragments of the rows whose state, set or claim moved."""
        other_set = (self.slots[rows] != slots) | (self.claims[rows] != claims)
        stale = (snap.w_stamp[rows] != self.stamp[rows]) | rows_any(other_set)
        moved = np.flatnonzero(stale)
        if len(moved) == 0:
            return
        r, s, c = rows[moved], slots[moved], claims[moved]
        self.stamp[r] = snap.w_stamp[r]
        alloc, cpu, ram = snap.g_alloc[r], snap.w_cpu_alloc[r], snap.w_ram_alloc[r]
        # As for single GPUs: a row back to the inputs it had (a replica placed and gone again) keeps all.
        changed = rows_any((alloc != self.alloc[r]) | ((s != self.slots[r]) | (c != self.claims[r])).any(
            axis=1, keepdims=True)) | (cpu != self.cpu[r]) | (ram != self.ram[r])
        if not changed.all():
            r, s, c, alloc, cpu, ram = r[changed], s[changed], c[changed], alloc[changed], cpu[changed], ram[changed]
            if len(r) == 0:
                return
        self.slots[r], self.claims[r], self.alloc[r], self.cpu[r], self.ram[r] = s, c, alloc, cpu, ram
        free = free_milli(snap, r)
        total = snap.g_total[r[:, None], s]
        taken = np.clip((snap.g_alloc[r[:, None], s] - c) * FULL_MILLI // np.where(total > 0, total, 1),
                        0, FULL_MILLI)
        after_free = free.copy()
        np.put_along_axis(after_free, s, taken, axis=1)
        host = self.host[r] = host_free(snap, r)
        col_work, col_arrays = self.columns.work, self.columns.arrays
        access = type_access([self.products[x] for x in r.tolist()], col_work)
        self.frag_before[r], self.total_before[r] = shape_fragments(free, host, access, col_arrays)
        self.frag_after[r], self.total_after[r] = shape_fragments(after_free, host - self.claim_host, access,
                                                                   col_arrays)
        self.scored[r] = False

    def score(self, snap: ClusterSnapshot, rows: IntArray, slots: IntArray, claims: IntArray, work: Workload,
              arrays: WorkloadArrays) -> FloatArray:
        """Scores of the candidate sets (row ``rows[i]`` takes ``claims[i]`` on ``slots[i]``) under ``work``."""
        self._refresh(snap, rows, slots, claims)
        w = self.columns.weights_for(work)
        assert w is not None  # ``fits`` checked the columns
        if self.scored_with is None or self.scored_with[0] is not w or self.scored_with[1] is not arrays:
            key = _scoring_key(w, arrays)
            if key != self.scored_for:
                self.scored[:] = False
            self.scored_for, self.scored_with = key, (w, arrays)
        todo = rows[~self.scored[rows]]
        if len(todo):
            host_now = self.host[todo]
            after = _expected(self.frag_after[todo], self.total_after[todo],
                              host_backed(host_now - self.claim_host, arrays), w, arrays)
            before = _expected(self.frag_before[todo], self.total_before[todo], host_backed(host_now, arrays), w,
                               arrays)
            self.scores[todo] = scores_from_increases(after - before)
            self.scored[todo] = True
        result: FloatArray = self.scores[rows]
        return result


def gpu_set_memo(snap: ClusterSnapshot, width: int, claim_host: tuple[int, int], work: Workload) -> GpuSetMemo:
    """The snapshot's memo for this request, rebuilt when rows moved or the workload has a new shape."""
    memos: dict[tuple[int, int, int], GpuSetMemo] = snap.memo.setdefault("fragmentation.sets", {})
    key = (width, *claim_host)
    memo = memos.get(key)
    if memo is None or not memo.fits(snap, work):
        keep = [] if memo is None or memo.layout != snap.layout else [s for s in memo.shapes if s in work.shapes]
        shapes = keep + [s for s in work.shapes if s not in keep]
        if len(memos) >= _MEMOS or _large(snap, shapes):
            memos.clear()
        memo = memos[key] = GpuSetMemo(snap, width, claim_host, shapes)
    return memo


def _large(snap: ClusterSnapshot, shapes: list[ReplicaShape]) -> bool:
    """Whether a memo over ``shapes`` is large (a workload of hundreds of distinct shapes): keep it alone."""
    return bool(snap.rows * int(snap.g_ok.shape[1]) * len(shapes) * 8 >= _LARGE)


def first_rows_candidate(snap: ClusterSnapshot, mask: BoolArray) -> tuple[int, int] | None:
    """(row, slot) of the first single-GPU candidate in name order, then GPU index; None without any."""
    order = snap.name_order()
    if len(order) != mask.shape[0]:
        order = order[order < mask.shape[0]]
    by_name = rows_any(mask)[order]
    if len(by_name) == 0:
        return None
    first = int(np.argmax(by_name))
    if not by_name[first]:
        return None
    row = int(order[first])
    flags, indexes = mask[row].tolist(), snap.g_index[row].tolist()
    slot = min((indexes[s], s) for s, flag in enumerate(flags) if flag)[1]
    return row, slot


_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def rows_any(mask: BoolArray) -> BoolArray:
    """``mask.any(axis=1)``, reading each row of up to 8 flags as one integer when the layout allows.

    numpy's per-row reduction over a short axis costs ~7x a flat pass; rows of 8 GPU slots are 8 bytes.
    """
    width = mask.shape[1]
    word = _WORDS.get(width)
    if word is not None and mask.dtype == np.bool_ and mask.flags.c_contiguous:
        return np.asarray(mask.view(word).ravel() != 0, dtype=np.bool_)
    return np.asarray(mask.any(axis=1), dtype=np.bool_)


def _scoring_key(weights: FloatArray, arrays: WorkloadArrays) -> tuple[bytes, float, bytes]:
    """What scores depend on besides the rows: the workload's weights and the host-stranding terms (by value,
    so an equal workload rebuilt keeps the scores)."""
    per_gpu = arrays.host_per_gpu
    return weights.tobytes(), arrays.host_weight, b"" if per_gpu is None else per_gpu.tobytes()
