"""Gantry's own strategies on the trace: every decision is the placement core's ``place()``.

Mapping (documented in docs/benchmarks/packing.md):

- node → Worker: its GPUs (product = trace GPU type, VRAM from ``trace.VRAM_GIB``), RAM = node memory,
  CPU = node CPU (milli-cores, as the trace gives it).
- pod → one replica of the model named after the pod (a pod drawn twice = two replicas of one model).
  Its ``ResourceRequest`` claims ``gpu_milli/1000`` of every GPU it uses (the core's utilisation claim),
  on ``num_gpu`` GPUs of one worker; RAM = pod memory, CPU = pod CPU. A single-type ``gpu_spec`` becomes the model's
  ``GpuSelector.gpu_type``. CPU-only pods are CPU-only replicas (``cpu_only`` fit strategy).
- Multi-type ``gpu_spec`` constraints, which Gantry's GPU selector does not express, are enforced by one
  bench-only filter plugin (``trace_host``) added to the profile. CPU and memory are the core's own checks.

The ClusterSnapshot is updated incrementally: one ``upsert_instance`` per placed pod.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import numpy.typing as npt

from shared.core.placement import DEFAULT_PROFILE, ClusterSnapshot, Profile, ScorerConfig, place
from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import (
    Backend,
    Category,
    Decision,
    Gpu,
    GpuSelector,
    Instance,
    InstanceState,
    ModelSpec,
    PlacementStrategy,
    ResourceRequest,
    Worker,
)
from shared.core.placement.filters import FILTERS
from shared.core.placement.filters.base import Filter

from .baselines import Choice
from .cluster import FULL, ClusterState, PodShape
from .trace import VRAM_GIB, Nodes

MIB = 1 << 20
GIB = 1 << 30


class TraceHostFilter(Filter):
    """Bench-only filter: the trace pod's multi-type GPU constraint, per worker row.

    The harness sets ``allowed`` (one flag per snapshot row) before each ``place()`` call.
    """

    name = "trace_host"
    allowed: ClassVar[npt.NDArray[np.bool_]] = np.zeros(0, dtype=bool)
    row_of: ClassVar[dict[str, int]] = {}

    def check(self, ctx: PlacementContext, worker: Worker) -> str | None:
        """Drop workers without a GPU type the pod accepts."""
        return None if self.allowed[self.row_of[worker.name]] else "wrong GPU type"

    def keep_mask(self, ctx: PlacementContext) -> npt.NDArray[np.bool_]:
        """The harness-computed flags."""
        return self.allowed




def trace_workers(nodes: Nodes) -> list[Worker]:
    """The trace's nodes as Gantry workers (VRAM rounded down to whole KiB)."""
    out = []
    for i, name in enumerate(nodes.names):
        gpus: tuple[Gpu, ...] = ()
        if nodes.gpus[i] > 0:
            product = nodes.type_names[int(nodes.gpu_type[i])]
            total = VRAM_GIB[product] * GIB
            gpus = tuple(Gpu(index=g, product=product, vram_total=total) for g in range(int(nodes.gpus[i])))
        out.append(Worker(name=name, gpus=gpus, ram_total=int(nodes.mem[i]) * MIB, cpu_total=int(nodes.cpu[i])))
    return out


def _profile(strategy: str, scorers: tuple[ScorerConfig, ...], cpu: bool) -> Profile:
    return Profile(
        name=f"trace-{strategy}{'-cpu' if cpu else ''}",
        filters=("cluster", "gpu_selector", "labels", "status", "backend", TraceHostFilter.name),
        fit_strategies=("cpu_only",) if cpu else ("single_gpu", "multi_gpu"),
        scorers=scorers,
    )


STRATEGY_SCORERS: dict[str, tuple[ScorerConfig, ...]] = {
    "default": DEFAULT_PROFILE.scorers,  # with models naming no strategy: the 'auto' strategy
    "binpack": (ScorerConfig(name="placement"), ScorerConfig(name="worker_fill")),
    "spread": (ScorerConfig(name="placement"),),
    "fragmentation": (ScorerConfig(name="fragmentation"),),
}


class CorePolicy:
    """Decides through ``shared.core.placement.place`` with a profile of the core's scorers."""

    def __init__(self, strategy: str, nodes: Nodes) -> None:
        self.name = f"gantry-{strategy}"
        self.strategy = strategy
        scorers = STRATEGY_SCORERS[strategy]
        self.gpu_profile = _profile(strategy, scorers, cpu=False)
        self.cpu_profile = _profile(strategy, scorers, cpu=True)
        self.placement = {"spread": PlacementStrategy.SPREAD, "binpack": PlacementStrategy.BINPACK}.get(
            strategy, PlacementStrategy.AUTO)
        self.snapshot = ClusterSnapshot.from_parts(trace_workers(nodes))
        rows = np.array([self.snapshot.row_of(n) for n in nodes.names], dtype=np.int64)
        if not np.array_equal(rows, np.arange(len(nodes))):
            raise RuntimeError("snapshot rows must follow the node order")
        TraceHostFilter.row_of = {n: i for i, n in enumerate(nodes.names)}
        # Registered only when a trace replay runs, so the core's registry stays as shipped elsewhere.
        FILTERS.setdefault(TraceHostFilter.name, TraceHostFilter)
        self.placed = 0
        self.current_model = ""

    def model_spec(self, shape: PodShape, model: str) -> ModelSpec:
        """The trace pod as a Gantry model (one replica per pod)."""
        single_type = shape.spec if shape.spec and "|" not in shape.spec else None
        return ModelSpec(
            name=model,
            backend=Backend.CUSTOM,
            categories=(Category.LLM,),
            placement_strategy=self.placement,
            cpu_offloading=shape.num_gpu == 0,
            gpu_selector=GpuSelector(gpu_type=single_type) if single_type else None,
        )

    @staticmethod
    def request(shape: PodShape) -> ResourceRequest:
        """Claims: ``gpu_milli/1000`` of each of ``num_gpu`` GPUs, and the pod's memory as RAM."""
        ram = shape.mem * MIB
        if shape.num_gpu == 0:
            return ResourceRequest(vram=0, ram=ram, cpu=shape.cpu, basis="trace pod (CPU only)")
        return ResourceRequest(vram=1, ram=ram, cpu=shape.cpu, gpu_memory_utilization=shape.gpu_milli / FULL,
                               gpu_count=shape.num_gpu, basis="trace pod")

    def representatives(self, feasible: npt.NDArray[np.bool_], model: str) -> npt.NDArray[np.bool_]:
        """Among feasible rows, the lowest-named worker of each class of identical workers.

        Only for CPU-only pods, which the core scores on its reference path (one Candidate per
        worker), to save time: binpack, worker_fill and spread score a worker from its own state (allocatable VRAM and
        RAM, GPU types, instance counts of this model and of others) and break ties by name, and spread
        normalizes over the min/max of those counts, so dropping the higher-named twins of a worker
        cannot change the decision.
        """
        snap = self.snapshot
        n = snap.rows
        per_worker, per_gpu = snap.model_count_columns(model)
        key = np.concatenate([
            snap.g_alloc[:n], snap.g_type[:n], snap.g_instances[:n], per_gpu,
            np.stack([snap.w_ram_alloc[:n], snap.w_instances[:n], per_worker], axis=1),
        ], axis=1)
        rows = np.flatnonzero(feasible)
        rows = rows[np.argsort(snap.ranks()[rows], kind="stable")]
        seen: dict[bytes, int] = {}
        for r in rows.tolist():
            seen.setdefault(key[r].tobytes(), r)
        keep = np.zeros(n, dtype=bool)
        keep[list(seen.values())] = True
        return keep

    def decide(self, state: ClusterState, shape: PodShape, model: str) -> Decision | None:
        """The core's decision for one pod, or None when it is unschedulable."""
        host_ok = np.ones(len(state.nodes), dtype=bool)
        if shape.spec and "|" in shape.spec:
            host_ok = host_ok & state.type_ok(shape)
        if shape.num_gpu == 0 and self.strategy in ("binpack", "spread"):
            host_ok = self.representatives(host_ok & state.feasible(shape), model)
        TraceHostFilter.allowed = host_ok
        profile = self.cpu_profile if shape.num_gpu == 0 else self.gpu_profile
        result = place(self.snapshot, self.model_spec(shape, model), 0.0, profile, request=self.request(shape))
        return result if isinstance(result, Decision) else None

    def choose_named(self, state: ClusterState, shape: PodShape, model: str) -> Choice | None:
        """Place one pod through the core and record the instance in the snapshot."""
        decision = self.decide(state, shape, model)
        if decision is None:
            return None
        c = decision.candidate
        self.placed += 1
        self.snapshot.upsert_instance(Instance(
            id=f"i{self.placed}", model=model, state=InstanceState.RUNNING, worker=c.worker,
            gpu_indexes=c.gpu_indexes, vram_claims=c.vram_claims, ram_claim=c.ram_claim, cpu_claim=c.cpu_claim,
            created_at=float(self.placed),
        ))
        row = self.snapshot.row_of(c.worker)
        assert row is not None
        return row, c.gpu_indexes

    def choose(self, state: ClusterState, shape: PodShape) -> Choice | None:
        """Policy protocol: the model name is set by the replay through ``on_arrival``."""
        return self.choose_named(state, shape, self.current_model)
