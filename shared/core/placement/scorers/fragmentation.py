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

from collections.abc import Sequence
from typing import Annotated

import msgspec
import numpy as np

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Candidate, Instance
from shared.core.placement.fitting.cpu_only import RowBatch
from shared.core.placement.fitting.multi_gpu import GpuSetBatch
from shared.core.placement.fitting.single_gpu import GpuBatch
from shared.core.placement.scorers.base import Scorer
from shared.core.placement.scorers.fragmentation_cache import (
    HOST_DIMS,
    first_rows_candidate,
    free_milli,
    gpu_set_memo,
    host_free,
    products,
    single_gpu_memo,
    window_counts,
)
from shared.core.placement.scorers.fragmentation_kernels import (
    FULL_MILLI,
    MAX,
    BoolArray,
    FloatArray,
    IntArray,
    ReplicaShape,
    Workload,
    WorkloadArrays,
    expected_fragmentation,
    fragmentation_increase,
    score_from_increase,
    scores_from_increases,
    single_slot_fragmentation,
    type_access,
)
from shared.core.placement.snapshot import CPU_UNCHECKED, ClusterSnapshot, WorkerView

__all__ = [  # the kernels, re-exported: the trace replay and the tests import them from here
    "FULL_MILLI", "HOST_WEIGHT", "MAX", "Fragmentation", "FragmentationArgs", "ReplicaShape", "Workload",
    "WorkloadArrays", "expected_fragmentation", "fragmentation_increase", "score_from_increase",
    "scores_from_increases", "single_slot_fragmentation", "type_access",
]

# ------------------------------------------------------------------------------------------- plugin

WINDOW = 1024  # the most recent instances the workload is learned from
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

    def fast_workload(self, snap: ClusterSnapshot, gpus: int, milli: int, host: tuple[int, int]
                      ) -> tuple[Workload, WorkloadArrays]:
        """``workload`` for the fast paths (the request's shape given by its fields): the same distribution,
        kept up to date from the window's changes."""
        assert isinstance(self.args, FragmentationArgs)
        counts = window_counts(snap, self.args.window)
        counts.sync(snap, lambda instance_id: _shape_of(snap, instance_id))
        return counts.workload(gpus, milli, host, self.host_weight)

    def score_batch(self, ctx: PlacementContext, batch: GpuBatch) -> FloatArray:
        """Fast path: every single-GPU candidate (rows x slots), from fragments kept between decisions."""
        snap = ctx.snapshot
        first = first_rows_candidate(snap, batch.mask)
        if first is None:
            return np.zeros(batch.mask.shape, dtype=np.float64)
        claims = batch.claims
        if claims.shape != batch.mask.shape:
            claims = np.broadcast_to(claims, batch.mask.shape)
        # The reference path learns from the lowest-named candidate's shape; so must this one.
        r0, s0 = first
        host = (batch.cpu_claim, batch.ram_claim)
        work, arrays = self.fast_workload(snap, 1, _ceil_milli([int(claims[r0, s0])], [int(snap.g_total[r0, s0])]),
                                          host)
        if len(work) == 0:
            return scores_from_increases(np.zeros(batch.mask.shape, dtype=np.float64))
        return single_gpu_memo(snap, host, work).score(snap, claims, work, arrays)

    def score_sets(self, ctx: PlacementContext, batch: GpuSetBatch) -> FloatArray:
        """Fast path for multi-GPU candidates (one set per worker), from fragments kept between decisions."""
        snap = ctx.snapshot
        if len(batch) == 0:
            return np.zeros(0, dtype=np.float64)
        f = int(np.argmin(snap.ranks()[batch.rows]))  # one set per worker: the first by name is the first
        milli = _ceil_milli(batch.claims[f].tolist(), snap.g_total[batch.rows[f], batch.slots[f]].tolist())
        work, arrays = self.fast_workload(snap, batch.width, milli, (batch.cpu_claim, batch.ram_claim))
        if len(work) == 0:
            return scores_from_increases(np.zeros(len(batch), dtype=np.float64))
        memo = gpu_set_memo(snap, batch.width, (batch.cpu_claim, batch.ram_claim), work)
        return memo.score(snap, batch.rows, batch.slots, batch.claims, work, arrays)

    def _rows_state(self, ctx: PlacementContext, rows: IntArray, first: Candidate
                    ) -> tuple[WorkloadArrays, IntArray, IntArray, BoolArray]:
        """(workload arrays, free milli per slot, host free (milli-cores, RAM), type access) of ``rows``."""
        snap = ctx.snapshot
        work = self.workload(ctx, first)
        arrays = work.arrays(host_dims=HOST_DIMS, host_weight=self.host_weight)
        return arrays, free_milli(snap, rows), host_free(snap, rows), type_access(products(snap, rows), work)

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


def _shape_of(snapshot: ClusterSnapshot, instance_id: str) -> ReplicaShape | None:
    instance = snapshot.instance(instance_id)
    return None if instance is None else instance_shape(snapshot, instance)


def _ceil_milli(claims: Sequence[int], totals: Sequence[int]) -> int:
    """The largest per-GPU claim in whole milli-GPU, rounded up (as ``candidate_shape``), at most 1000."""
    milli = max((-(-c * FULL_MILLI // t) for c, t in zip(claims, totals, strict=True) if t > 0), default=0)
    return min(milli, FULL_MILLI)
