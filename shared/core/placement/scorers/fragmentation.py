"""Fragmentation scorer: prefer the placement that strands the least GPU capacity for the workload.

The idea follows "fragmentation gradient descent" (Weng et al., USENIX ATC'23). For a worker and one
replica *shape* (GPU count, per-GPU share of a GPU, host demands: CPU and RAM, allowed GPU types), the
worker's **fragment** is the free GPU capacity that shape cannot use: all of it when the shape cannot be
placed on the worker at all, otherwise the free capacity of the GPUs too full to take one of its
per-GPU parts. The worker's **expected fragmentation** weighs the fragment of every shape by how often
the cluster sees that shape. A candidate scores by how little it raises the expected fragmentation of
its worker(s): ``max_score x sigmoid(-delta)``, delta in GPUs.

It is multi-resource by construction: a shape the worker's CPU or RAM can no longer host counts *all* of
the worker's free GPU capacity as a fragment, so a placement that exhausts a worker's CPU or RAM while GPUs
stay free there is charged for those GPUs (the stranding Tetris's dot-product alignment, Grandl et al.,
SIGCOMM'14, tries to avoid by matching demand and free vectors; FGD measures it directly).

Everything here is pure and deterministic. GPU capacity is counted in *milli-GPU* (per-mille of a GPU's
VRAM, integers, so comparisons are exact); a GPU that does not exist is marked by a negative free value.
The workload comes from recent requests (``Workload.learn``), so the scorer adapts to the replica sizes
the cluster actually sees.

The kernels are vectorized over workers so that a trace replay (bench/packing.py) calls the very same
code as a single decision does.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated

import msgspec
import numpy as np
import numpy.typing as npt

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Candidate, Instance
from shared.core.placement.fitting.cpu_only import RowBatch
from shared.core.placement.fitting.multi_gpu import GpuSetBatch
from shared.core.placement.fitting.single_gpu import GpuBatch
from shared.core.placement.scorers.base import Scorer
from shared.core.placement.snapshot import CPU_UNCHECKED, ClusterSnapshot, WorkerView

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
        counts = Counter(s for s in recent if s.gpus > 0 and s.milli > 0)
        total = sum(counts.values())
        if total == 0:
            return Workload(shapes=(), weights=())
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
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
    gfree = np.maximum(free, 0)
    total = gfree.sum(axis=-1)  # (...)
    if work.weights.size == 0:
        return np.zeros(total.shape, dtype=np.float64)
    usable = free[..., None, :] >= work.milli[:, None]  # (..., M, G)
    fits_gpu = usable.sum(axis=-1) >= work.gpus  # (..., M)
    fits_host = (host_free[..., None, :] >= work.host).all(axis=-1)  # (..., M)
    placeable = fits_gpu & fits_host & access
    stranded = np.where(usable, 0, gfree[..., None, :]).sum(axis=-1)  # (..., M)
    frag = np.where(placeable, stranded, total[..., None])
    result: FloatArray = (frag @ work.weights) / FULL_MILLI
    if work.host_weight > 0 and work.host_per_gpu is not None:
        per_gpu = work.host_per_gpu
        dims = per_gpu > 0
        if dims.any():
            backed = (np.maximum(host_free[..., dims], 0) / per_gpu[dims]).min(axis=-1)  # GPUs the host can back
            result = result + work.host_weight * np.maximum(total / FULL_MILLI - backed, 0.0)
    return result


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
    gfree = np.maximum(free, 0)  # (L, G)
    total = gfree.sum(axis=-1)  # (L,)
    if work.weights.size == 0:
        return np.zeros((rows, width), dtype=np.float64)
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
    total_after = total[:, None] - old_free + new_free  # (L, S)
    fits_host = (host_after[:, None, :] >= work.host).all(axis=-1)  # (L, M)
    placeable = (count_after >= work.gpus) & (fits_host & access)[:, None, :]
    frag = np.where(placeable, stranded_after, total_after[:, :, None])
    result: FloatArray = (frag @ work.weights) / FULL_MILLI
    if work.host_weight > 0 and work.host_per_gpu is not None:
        per_gpu = work.host_per_gpu
        dims = per_gpu > 0
        if dims.any():
            backed = (np.maximum(host_after[:, dims], 0) / per_gpu[dims]).min(axis=-1)  # (L,)
            result = result + work.host_weight * np.maximum(total_after / FULL_MILLI - backed[:, None], 0.0)
    return result


def score_from_increase(delta: float, max_score: float) -> float:
    """Map a fragmentation increase (GPUs) to a score in (0, max_score): smaller increase, higher."""
    # Clamp the exponent: a huge increase should score ~0, not overflow.
    return max_score / (1.0 + math.exp(min(max(delta, -50.0), 50.0)))


def scores_from_increases(delta: FloatArray) -> FloatArray:
    """``score_from_increase`` over an array, as both of the plugin's paths compute it.

    Increases and scores are rounded to 1e-9: the fast path's batched kernels and the reference path's
    per-candidate ones sum in different orders, and the last bits must not tell them apart.
    """
    rounded = np.round(delta, 9)
    result: FloatArray = np.round(MAX / (1.0 + np.exp(np.clip(rounded, -50.0, 50.0))), 9)
    return result


# ------------------------------------------------------------------------------------------- plugin

WINDOW = 1024  # the most recent instances the workload is learned from
MAX = 100.0
HOST_DIMS = 2  # (milli-cores, RAM bytes)
HOST_WEIGHT = 0.5  # trace replay (bench/packing.py): 0.3 and 1.0 both strand ~30 GPUs fewer than 0


class FragmentationArgs(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Parameters of the fragmentation scorer."""

    window: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = WINDOW  # recent instances the workload is learned from
    # weight of the host-stranding term (GPUs left without CPU/RAM to back them); 0 is FGD's measure alone
    host_weight: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] = HOST_WEIGHT


def _host_free(cpu: int, ram: int) -> tuple[int, int]:
    """A worker's free (milli-cores, RAM), never negative; an unreported CPU count never limits."""
    return (max(min(cpu, CPU_UNCHECKED), 0), max(ram, 0))


def _milli(value: int, total: int) -> int:
    """``value`` bytes of a ``total``-byte GPU, in whole milli-GPU (rounded down, within 0..1000)."""
    if total <= 0:
        return 0
    return min(max(value * FULL_MILLI // total, 0), FULL_MILLI)


def instance_shape(snapshot: ClusterSnapshot, instance: Instance) -> ReplicaShape | None:
    """The shape of a placed instance: its GPU count, largest per-GPU claim (milli) and RAM claim."""
    if instance.worker is None:
        return None
    parts = [(instance.worker, instance.gpu_indexes, instance.vram_claims)]
    parts += [(s.worker, s.gpu_indexes, s.vram_claims) for s in instance.subordinates]
    gpus, milli = 0, 0
    for name, indexes, claims in parts:
        worker = snapshot.worker(name)
        totals = {g.index: g.vram_total for g in worker.gpus} if worker is not None else {}
        for index, claim in zip(indexes, claims, strict=False):
            gpus += 1
            total = totals.get(index, 0)
            milli = max(milli, -(-claim * FULL_MILLI // total) if total > 0 else 0)
    return ReplicaShape(gpus=gpus, milli=min(milli, FULL_MILLI), host=(instance.cpu_claim, instance.ram_claim))


def candidate_shape(ctx: PlacementContext, cand: Candidate) -> ReplicaShape:
    """The shape of the request being placed, as one candidate would claim it."""
    view = ctx.view(cand.worker)
    totals = {g.index: g.total for g in view.gpus}
    milli = max((-(-c * FULL_MILLI // totals[i]) for i, c in zip(cand.gpu_indexes, cand.vram_claims, strict=True)
                 if totals.get(i, 0) > 0), default=0)
    gpus = len(cand.gpu_indexes) + sum(len(s.gpu_indexes) for s in cand.subordinates)
    return ReplicaShape(gpus=gpus, milli=min(milli, FULL_MILLI), host=(cand.cpu_claim, cand.ram_claim))


def worker_state(view: WorkerView, width: int) -> tuple[IntArray, IntArray]:
    """(free milli per GPU slot, padded to ``width`` with -1; host free = (milli-cores, RAM) allocatable)."""
    free = np.full(width, -1, dtype=np.int64)
    for slot, gpu in enumerate(view.gpus):
        if gpu.schedulable:
            free[slot] = _milli(gpu.allocatable, gpu.total)
    return free, np.array(_host_free(view.cpu_allocatable, view.ram_allocatable), dtype=np.int64)


class Fragmentation(Scorer):
    """Prefers the candidate that raises its workers' expected fragmentation the least.

    The workload is learned from the snapshot's most recent instances (``WINDOW``), with the request
    itself counted once, so a cold cluster still has one shape to protect. Scores are
    ``100 x sigmoid(-increase)``, the increase in GPUs summed over the candidate's workers.
    """

    name = "fragmentation"
    max_score = MAX
    Args = FragmentationArgs

    @property
    def host_weight(self) -> float:
        """The host-stranding term's weight."""
        assert isinstance(self.args, FragmentationArgs)
        return self.args.host_weight

    def workload(self, ctx: PlacementContext, first: Candidate | None) -> Workload:
        """The learned workload plus the request's own shape."""
        assert isinstance(self.args, FragmentationArgs)
        shapes = _recent_shapes(ctx.snapshot, self.args.window)
        if first is not None:
            shapes.append(candidate_shape(ctx, first))
        return Workload.learn(shapes)

    def _delta(self, ctx: PlacementContext, cand: Candidate, work: Workload) -> float:
        parts = [(cand.worker, cand.gpu_indexes, cand.vram_claims, cand.ram_claim, cand.cpu_claim)]
        parts += [(s.worker, s.gpu_indexes, s.vram_claims, s.ram_claim, s.cpu_claim) for s in cand.subordinates]
        arrays = work.arrays(host_dims=HOST_DIMS, host_weight=self.host_weight)
        delta = 0.0
        for name, indexes, claims, ram, cpu in parts:
            view = ctx.view(name)
            width = max(len(view.gpus), 1)
            free, host = worker_state(view, width)
            after = free.copy()
            by_index = {g.index: g for g in view.gpus}
            for index, claim in zip(indexes, claims, strict=True):
                gpu = by_index[index]
                after[gpu.slot] = _milli(gpu.allocatable - claim, gpu.total)
            access = type_access([_product(view)], work)
            pair_free = np.stack([free, after])
            pair_host = np.stack([host, host - np.array([cpu, ram], dtype=np.int64)])
            frag = expected_fragmentation(pair_free, pair_host, np.repeat(access, 2, axis=0), arrays)
            delta += float(frag[1] - frag[0])
        return delta

    def score(self, ctx: PlacementContext, candidates: Sequence[Candidate]) -> list[float]:
        """Reference path."""
        if not candidates:
            return []
        work = self.workload(ctx, min(candidates, key=_key))
        deltas = np.array([self._delta(ctx, c, work) for c in candidates], dtype=np.float64)
        return [float(v) for v in scores_from_increases(deltas)]

    def score_batch(self, ctx: PlacementContext, batch: GpuBatch) -> FloatArray:
        """Fast path: every single-GPU candidate of a worker at once (rows x slots)."""
        snap = ctx.snapshot
        rows, width = batch.mask.shape
        out = np.zeros((rows, width), dtype=np.float64)
        live = np.flatnonzero(batch.mask.any(axis=1))
        if len(live) == 0:
            return out
        # The reference path learns from the lowest-named candidate; so must this one.
        ranks = snap.ranks()
        cand_rows, cand_slots = np.nonzero(batch.mask)
        pick = int(np.lexsort((snap.g_index[cand_rows, cand_slots], ranks[cand_rows]))[0])
        r0, s0 = int(cand_rows[pick]), int(cand_slots[pick])
        first = Candidate(worker=snap.name_of(r0), gpu_indexes=(int(snap.g_index[r0, s0]),),
                          vram_claims=(int(np.broadcast_to(batch.claims, batch.mask.shape)[r0, s0]),),
                          ram_claim=batch.ram_claim, cpu_claim=batch.cpu_claim)
        work = self.workload(ctx, first)
        arrays = work.arrays(host_dims=HOST_DIMS, host_weight=self.host_weight)
        total = snap.g_total[live]
        ok = snap.g_ok[live]
        alloc = snap.g_alloc[live]
        safe = np.where(total > 0, total, 1)
        free = np.where(ok, np.clip(alloc * FULL_MILLI // safe, 0, FULL_MILLI), -1)
        claims = np.broadcast_to(batch.claims, batch.mask.shape)[live]
        after_slot = np.where(ok, np.clip((alloc - claims) * FULL_MILLI // safe, 0, FULL_MILLI), -1)
        host = np.stack([np.clip(snap.w_cpu_alloc[live], 0, CPU_UNCHECKED), np.maximum(snap.w_ram_alloc[live], 0)],
                        axis=1)
        products = [snap.type_names()[t][1] if t >= 0 else "" for t in snap.g_type[live, 0]]
        access = type_access(products, work)
        before = expected_fragmentation(free, host, access, arrays)  # (L,)
        claim_host = np.array([batch.cpu_claim, batch.ram_claim], dtype=np.int64)
        frag_after = single_slot_fragmentation(free, after_slot, host - claim_host, access, arrays)
        delta = frag_after - before[:, None]
        out[live] = scores_from_increases(delta)
        return out


    def _rows_state(self, ctx: PlacementContext, rows: IntArray, first: Candidate
                    ) -> tuple[WorkloadArrays, IntArray, IntArray, BoolArray]:
        """(workload arrays, free milli per slot, host free (milli-cores, RAM), type access) of ``rows``."""
        snap = ctx.snapshot
        work = self.workload(ctx, first)
        total, alloc = snap.g_total[rows], snap.g_alloc[rows]
        safe = np.where(total > 0, total, 1)
        free = np.where(snap.g_ok[rows], np.clip(alloc * FULL_MILLI // safe, 0, FULL_MILLI), -1)
        host = np.stack([np.clip(snap.w_cpu_alloc[rows], 0, CPU_UNCHECKED), np.maximum(snap.w_ram_alloc[rows], 0)],
                        axis=1)
        products = [snap.type_names()[t][1] if t >= 0 else "" for t in snap.g_type[rows, 0]]
        arrays = work.arrays(host_dims=HOST_DIMS, host_weight=self.host_weight)
        return arrays, free, host, type_access(products, work)

    def score_sets(self, ctx: PlacementContext, batch: GpuSetBatch) -> FloatArray:
        """Fast path for multi-GPU candidates (one set per worker): every worker's increase at once."""
        snap = ctx.snapshot
        if len(batch) == 0:
            return np.zeros(0, dtype=np.float64)
        order = np.lexsort((*[batch.indexes[:, k] for k in reversed(range(batch.width))], snap.ranks()[batch.rows]))
        f = int(order[0])
        first = Candidate(worker=snap.name_of(int(batch.rows[f])), gpu_indexes=tuple(batch.indexes[f].tolist()),
                          vram_claims=tuple(batch.claims[f].tolist()), ram_claim=batch.ram_claim,
                          cpu_claim=batch.cpu_claim)
        arrays, free, host, access = self._rows_state(ctx, batch.rows, first)
        rows = batch.rows[:, None]
        total = snap.g_total[rows, batch.slots]
        taken = np.clip((snap.g_alloc[rows, batch.slots] - batch.claims) * FULL_MILLI // np.where(total > 0, total, 1),
                        0, FULL_MILLI)
        after = free.copy()
        np.put_along_axis(after, batch.slots, taken, axis=1)
        claim_host = np.array([batch.cpu_claim, batch.ram_claim], dtype=np.int64)
        delta = (expected_fragmentation(after, host - claim_host, access, arrays)
                 - expected_fragmentation(free, host, access, arrays))
        result: FloatArray = scores_from_increases(delta)
        return result

    def score_rows(self, ctx: PlacementContext, batch: RowBatch) -> FloatArray:
        """Fast path for CPU-only candidates: the increase that taking CPU and RAM there causes."""
        snap = ctx.snapshot
        if len(batch) == 0:
            return np.zeros(0, dtype=np.float64)
        f = int(np.argmin(snap.ranks()[batch.rows]))
        first = Candidate(worker=snap.name_of(int(batch.rows[f])), gpu_indexes=(), vram_claims=(),
                          ram_claim=batch.ram_claim, cpu_claim=batch.cpu_claim)
        arrays, free, host, access = self._rows_state(ctx, batch.rows, first)
        claim_host = np.array([batch.cpu_claim, batch.ram_claim], dtype=np.int64)
        delta = (expected_fragmentation(free, host - claim_host, access, arrays)
                 - expected_fragmentation(free, host, access, arrays))
        result: FloatArray = scores_from_increases(delta)
        return result


def _key(c: Candidate) -> tuple[str, tuple[int, ...], tuple[str, ...]]:
    return (c.worker, c.gpu_indexes, tuple(s.worker for s in c.subordinates))


def _product(view: WorkerView) -> str:
    return view.gpus[0].product if view.gpus else ""


def _recent(snapshot: ClusterSnapshot, window: int = WINDOW) -> list[Instance]:
    return snapshot.recent_placed(window)


_SHAPES = "fragmentation.shapes"


def _recent_shapes(snapshot: ClusterSnapshot, window: int) -> list[ReplicaShape]:
    """Shapes of the ``window`` most recent placed instances, each computed once per instance value.

    The memo lives on the snapshot (cleared when a worker's inventory may change, since a shape reads
    GPU totals) and is keyed by instance id, checked by identity: a replaced record is recomputed.
    """
    memo: dict[str, tuple[Instance, ReplicaShape | None]] = snapshot.memo.setdefault(_SHAPES, {})
    recent = snapshot.recent_placed(window)
    if len(memo) > 4 * max(window, len(recent)):
        memo.clear()  # ids of instances long gone: keep the memo bounded
    out: list[ReplicaShape] = []
    for inst in recent:
        hit = memo.get(inst.id)
        if hit is None or hit[0] is not inst:
            hit = memo[inst.id] = (inst, instance_shape(snapshot, inst))
        if hit[1] is not None:
            out.append(hit[1])
    return out
