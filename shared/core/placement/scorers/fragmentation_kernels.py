"""The fragmentation measure's kernels: replica shapes, the learned workload and expected fragmentation.

See ``fragmentation`` (the scorer plugin) for the idea (FGD, Weng et al., USENIX ATC'23; the host term
after Tetris, Grandl et al., SIGCOMM'14). Everything here is pure and deterministic; GPU capacity is in
*milli-GPU* (integers, so comparisons are exact) and a GPU that does not exist has a negative free value.
The kernels are vectorised over workers so that a trace replay (bench/packing.py) calls the very same
code as a single decision does.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FULL_MILLI = 1000  # milli-GPU in one whole GPU

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, order=True)
class ReplicaShape:
    """What one replica asks for, as seen by the fragmentation measure.

    ``milli`` is the per-GPU claim in milli-GPU (1000 for a whole GPU); ``host`` the demands of the
    worker's other resources, in the same order as the worker vectors given to the kernels (Gantry and
    the trace replay: milli-cores, then RAM); ``gpu_types`` the GPU products it accepts (empty: any).
    """

    gpus: int
    milli: int
    host: tuple[int, ...] = ()
    gpu_types: tuple[str, ...] = ()


@dataclass(frozen=True)
class Workload:
    """A distribution over replica shapes (weights sum to 1), as arrays for the kernels."""

    shapes: tuple[ReplicaShape, ...]
    weights: tuple[float, ...]

    @staticmethod
    def learn(recent: Iterable[ReplicaShape], coverage: float = 1.0) -> Workload:
        """The frequency of each GPU-using shape among ``recent`` requests.

        Shapes are ranked by count (ties by shape, for determinism) and the most frequent ones that
        together cover ``coverage`` of the requests are kept and renormalized: rare shapes add cost to
        every decision and barely move the expectation. Requests without GPUs are ignored: they
        cannot use GPU capacity, so they cannot make it a fragment.
        """
        if not 0.0 < coverage <= 1.0:
            raise ValueError("coverage must be in (0, 1]")
        return Workload.from_counts(Counter(recent), coverage)

    @staticmethod
    def from_counts(counts: Mapping[ReplicaShape, int], coverage: float = 1.0) -> Workload:
        """``learn`` from the count of each shape among the recent requests (the same result, bit for bit)."""
        if not 0.0 < coverage <= 1.0:
            raise ValueError("coverage must be in (0, 1]")
        kept_counts = {s: n for s, n in counts.items() if s.gpus > 0 and s.milli > 0 and n > 0}
        total = sum(kept_counts.values())
        if total == 0:
            return Workload(shapes=(), weights=())
        ranked = sorted(kept_counts.items(), key=lambda kv: (-kv[1], kv[0]))
        kept: list[tuple[ReplicaShape, int]] = []
        covered = 0
        for shape, count in ranked:
            if covered >= coverage * total:
                break
            kept.append((shape, count))
            covered += count
        return Workload(
            shapes=tuple(s for s, _ in kept),
            weights=tuple(c / covered for _, c in kept),
        )

    def __len__(self) -> int:
        return len(self.shapes)

    def arrays(self, host_dims: int, host_weight: float = 0.0) -> WorkloadArrays:
        """The workload as arrays, host demands padded with zeros to ``host_dims`` entries.

        ``host_weight`` > 0 adds the host-stranding term to the expected fragmentation (see
        ``expected_fragmentation``), with the workload's mean host demand per GPU as the exchange rate.
        """
        host = np.zeros((len(self.shapes), host_dims), dtype=np.int64)
        for i, s in enumerate(self.shapes):
            if len(s.host) > host_dims:
                raise ValueError(f"shape {s} has more host demands than the workers report ({host_dims})")
            host[i, : len(s.host)] = s.host
        gpus = np.array([s.gpus for s in self.shapes], dtype=np.int64)
        milli = np.array([s.milli for s in self.shapes], dtype=np.int64)
        weights = np.array(self.weights, dtype=np.float64)
        per_gpu = np.zeros(host_dims, dtype=np.float64)
        if host_weight > 0 and len(self.shapes):
            gpu_share = gpus * milli / FULL_MILLI  # GPUs' worth each shape takes
            per_gpu = (weights[:, None] * host / gpu_share[:, None]).sum(axis=0) / weights.sum()
        return WorkloadArrays(gpus=gpus, milli=milli, host=host, weights=weights, host_weight=host_weight,
                              host_per_gpu=per_gpu)


@dataclass(frozen=True)
class WorkloadArrays:
    """Column arrays of a workload: M shapes."""

    gpus: IntArray  # (M,)
    milli: IntArray  # (M,)
    host: IntArray  # (M, H)
    weights: FloatArray  # (M,)
    host_weight: float = 0.0  # weight of the host-stranding term (0: FGD's measure alone)
    host_per_gpu: FloatArray | None = None  # (H,) mean host demand per GPU of the workload


def type_access(gpu_types: Sequence[str], workload: Workload) -> BoolArray:
    """(N, M): whether each worker's GPU product is accepted by each shape."""
    out = np.ones((len(gpu_types), len(workload)), dtype=bool)
    for m, shape in enumerate(workload.shapes):
        if shape.gpu_types:
            allowed = set(shape.gpu_types)
            out[:, m] = [t in allowed for t in gpu_types]
    return out


def expected_fragmentation(
    free: IntArray,
    host_free: IntArray,
    access: BoolArray,
    work: WorkloadArrays,
) -> FloatArray:
    """Expected fragmentation, in GPUs, of each worker state.

    ``free`` is (..., G) free milli-GPU per GPU slot (negative: no such GPU), ``host_free`` (..., H),
    ``access`` (..., M) from ``type_access``. Returns (...). Zero for an empty workload.

    With ``work.host_weight`` > 0 it adds ``host_weight x`` the worker's *host-stranded GPUs*: free GPU
    capacity beyond what its free CPU and RAM can back at the workload's mean host demand per GPU
    (``max(0, free GPUs - min_h host_free_h / per_gpu_h)``). FGD's measure sees CPU only through whether
    each shape still fits; this term also charges a placement that drains a worker's CPU below what its
    free GPUs will need, before any single shape stops fitting (Tetris's multi-resource alignment idea,
    Grandl et al., SIGCOMM'14, measured in GPUs).
    """
    if work.weights.size == 0:
        return np.zeros(free.shape[:-1], dtype=np.float64)
    frag, total = shape_fragments(free, host_free, access, work)
    result: FloatArray = (frag @ work.weights) / FULL_MILLI
    backed = host_backed(host_free, work)
    if backed is not None:
        result = result + work.host_weight * np.maximum(total / FULL_MILLI - backed, 0.0)
    return result


def shape_fragments(free: IntArray, host_free: IntArray, access: BoolArray, work: WorkloadArrays
                    ) -> tuple[IntArray, IntArray]:
    """(the fragment of each shape, (..., M); the free capacity, (...)), in milli-GPU, before weighting.

    ``expected_fragmentation`` weighs these; the incremental fast path keeps them per worker and shape.
    """
    gfree = np.maximum(free, 0)
    total: IntArray = gfree.sum(axis=-1)  # (...)
    usable = free[..., None, :] >= work.milli[:, None]  # (..., M, G)
    fits_gpu = usable.sum(axis=-1) >= work.gpus  # (..., M)
    fits_host = (host_free[..., None, :] >= work.host).all(axis=-1)  # (..., M)
    placeable = fits_gpu & fits_host & access
    stranded = np.where(usable, 0, gfree[..., None, :]).sum(axis=-1)  # (..., M)
    frag: IntArray = np.where(placeable, stranded, total[..., None])
    return frag, total


def host_backed(host_free: IntArray, work: WorkloadArrays) -> FloatArray | None:
    """GPUs' worth of the workload each worker's free CPU and RAM can back, (...); None when the
    host-stranding term is off (``host_weight`` 0, or a workload without host demands)."""
    if work.host_weight > 0 and work.host_per_gpu is not None:
        per_gpu = work.host_per_gpu
        dims = per_gpu > 0
        if dims.any():
            backed: FloatArray = (np.maximum(host_free[..., dims], 0) / per_gpu[dims]).min(axis=-1)
            return backed
    return None


def fragmentation_increase(
    free: IntArray,
    host_free: IntArray,
    claim_milli: IntArray,
    claim_host: IntArray,
    access: BoolArray,
    work: WorkloadArrays,
) -> FloatArray:
    """How much each candidate raises its worker's expected fragmentation, in GPUs.

    Candidates are rows: ``free``/``claim_milli`` (C, G) (the claim on each GPU slot, zero where the
    candidate takes nothing), ``host_free``/``claim_host`` (C, H), ``access`` (C, M).
    """
    before = expected_fragmentation(free, host_free, access, work)
    after = expected_fragmentation(free - claim_milli, host_free - claim_host, access, work)
    delta: FloatArray = after - before
    return delta


def single_slot_fragmentation(
    free: IntArray,
    after_slot: IntArray,
    host_after: IntArray,
    access: BoolArray,
    work: WorkloadArrays,
) -> FloatArray:
    """(L, S): ``expected_fragmentation`` of each worker with slot ``s`` alone set to ``after_slot[l, s]``.

    Equal, bit for bit, to building every (L, S, G) state and calling ``expected_fragmentation`` on it
    (a test holds them equal), but in O(L x S x M) instead of O(L x S x M x G): only one slot changes, so
    the per-shape usable count, stranded capacity and total move by that slot's terms alone. The
    fragments are integers, so the sums are exact and the final weighting sees the same values.
    ``host_after`` (L, H) is the host's free resources after the claim.
    """
    rows, width = after_slot.shape
    if work.weights.size == 0:
        return np.zeros((rows, width), dtype=np.float64)
    frag, total_after = single_slot_fragments(free, after_slot, host_after, access, work)
    result: FloatArray = (frag @ work.weights) / FULL_MILLI
    backed = host_backed(host_after, work)  # (L,)
    if backed is not None:
        result = result + work.host_weight * np.maximum(total_after / FULL_MILLI - backed[:, None], 0.0)
    return result


def single_slot_fragments(free: IntArray, after_slot: IntArray, host_after: IntArray, access: BoolArray,
                          work: WorkloadArrays) -> tuple[IntArray, IntArray]:
    """``shape_fragments`` of each worker with slot ``s`` alone set to ``after_slot[l, s]``:
    ((L, S, M) fragments, (L, S) free capacity), in O(L x S x M)."""
    width = after_slot.shape[1]
    gfree = np.maximum(free, 0)  # (L, G)
    total = gfree.sum(axis=-1)  # (L,)
    milli = work.milli  # (M,)
    usable = free[:, None, :] >= milli[None, :, None]  # (L, M, G)
    count = usable.sum(axis=-1)  # (L, M)
    stranded = np.where(usable, 0, gfree[:, None, :]).sum(axis=-1)  # (L, M)
    old = free[:, :width]  # (L, S): the slot's value before
    old_free = np.maximum(old, 0)
    new_free = np.maximum(after_slot, 0)
    old_ok = old[:, :, None] >= milli  # (L, S, M)
    new_ok = after_slot[:, :, None] >= milli
    count_after = count[:, None, :] - old_ok + new_ok
    stranded_after = (stranded[:, None, :] - np.where(old_ok, 0, old_free[:, :, None])
                      + np.where(new_ok, 0, new_free[:, :, None]))
    total_after: IntArray = total[:, None] - old_free + new_free  # (L, S)
    fits_host = (host_after[:, None, :] >= work.host).all(axis=-1)  # (L, M)
    placeable = (count_after >= work.gpus) & (fits_host & access)[:, None, :]
    frag: IntArray = np.where(placeable, stranded_after, total_after[:, :, None])
    return frag, total_after


def score_from_increase(delta: float, max_score: float) -> float:
    """Map a fragmentation increase (GPUs) to a score in (0, max_score): smaller increase, higher."""
    # Clamp the exponent: a huge increase should score ~0, not overflow.
    return max_score / (1.0 + math.exp(min(max(delta, -50.0), 50.0)))


MAX = 100.0  # the scorer's best score


def scores_from_increases(delta: FloatArray) -> FloatArray:
    """``score_from_increase`` over an array, as both of the plugin's paths compute it.

    Increases and scores are rounded to 1e-9: the fast path's batched kernels and the reference path's
    per-candidate ones sum in different orders, and the last bits must not tell them apart.
    """
    rounded = np.round(delta, 9)
    result: FloatArray = np.round(MAX / (1.0 + np.exp(np.clip(rounded, -50.0, 50.0))), 9)
    return result
