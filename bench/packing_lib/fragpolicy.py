"""Fast path of the fragmentation strategy over the whole trace, using the scorer plugin's own kernels.

The decision rule is the scorer's: among feasible (node, GPUs) candidates, the smallest increase of the
node's expected fragmentation (``fragmentation_increase`` from
``shared.core.placement.scorers.fragmentation``), ties broken by worker name then GPU index, as the
placement core breaks them. What makes it fast is bookkeeping only: a pod changes one node, so the best
candidate of every node is cached per pod shape and recomputed only for nodes whose state moved.

The workload (distribution of replica shapes) is learned online from the pods that arrived so far
(a sliding window), re-learned on a doubling schedule, then every ``relearn_every`` arrivals.

``FragmentationFit.like_core()`` instead follows the plugin's own rule exactly (learn from the placed
replicas plus the request, CPU and RAM as host resources, no GPU-type constraint in the learned shapes,
re-learn at every decision): a unit test holds its decisions equal to ``place()`` with the
``fragmentation`` profile and with the default profile (models naming no strategy).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from shared.core.placement.scorers.fragmentation import (
    HOST_WEIGHT,
    ReplicaShape,
    Workload,
    WorkloadArrays,
    fragmentation_increase,
    type_access,
)

from .baselines import Choice
from .cluster import FULL, ClusterState, PodShape

TIE_DECIMALS = 9  # deltas equal to 1e-9 GPU are ties: never decide by float noise


MIB = 1 << 20


def replica_shape(shape: PodShape, core_view: bool = False) -> ReplicaShape:
    """The scorer's view of a pod: GPU count, per-GPU milli, (CPU, memory), allowed GPU types.

    ``core_view``: what the core plugin can see of a placed replica (CPU and RAM bytes, no type constraint).
    """
    if core_view:
        return ReplicaShape(gpus=shape.num_gpu, milli=shape.gpu_milli, host=(shape.cpu, shape.mem * MIB))
    types = tuple(sorted(shape.spec.split("|"))) if shape.spec else ()
    return ReplicaShape(gpus=shape.num_gpu, milli=shape.gpu_milli, host=(shape.cpu, shape.mem),
                        gpu_types=types)


@dataclass
class _Entry:
    version: npt.NDArray[np.int64]
    delta: npt.NDArray[np.float64]
    gpu: npt.NDArray[np.int64]


class FragmentationFit:
    """Minimum expected-fragmentation increase (the ``fragmentation`` scorer) over the trace."""

    name = "fragmentation"

    def __init__(self, window: int = 4096, relearn_every: int = 1024, coverage: float = 1.0,
                 core_view: bool = False, tie_fullest: bool = False, host_weight: float = 0.0) -> None:
        self.host_weight = host_weight
        self.window: deque[ReplicaShape] = deque(maxlen=window)
        self.relearn_every = relearn_every
        self.coverage = coverage
        self.core_view = core_view
        self.tie_fullest = tie_fullest
        self.arrivals = 0
        self.work: WorkloadArrays | None = None
        self.access: npt.NDArray[np.bool_] | None = None
        self.cache: dict[PodShape, _Entry] = {}
        self.name_rank: npt.NDArray[np.int64] | None = None

    @classmethod
    def like_core(cls, window: int = 1024, host_weight: float = HOST_WEIGHT) -> FragmentationFit:
        """The plugin's exact rule (see the module docstring); slow, for checks on small inputs."""
        return cls(window=window, relearn_every=1, coverage=1.0, core_view=True, host_weight=host_weight)

    def _due(self) -> bool:
        if self.relearn_every == 1:
            return True
        n = self.arrivals
        if n < self.relearn_every:
            return n & (n - 1) == 0  # 1, 2, 4, 8, ...
        return n % self.relearn_every == 0

    def observe(self, state: ClusterState, shape: PodShape) -> None:
        """Record an arriving request and re-learn the workload when due."""
        if not self.core_view:
            self.window.append(replica_shape(shape))
        self.arrivals += 1
        if self.name_rank is None:
            self.name_rank = np.argsort(np.argsort(np.array(state.nodes.names)))
        if self.work is None or self._due():
            recent = list(self.window)
            if self.core_view:  # placed replicas, plus the request itself
                recent.append(replica_shape(shape, core_view=True))
            workload = Workload.learn(recent, self.coverage)
            self.work = workload.arrays(host_dims=2, host_weight=self.host_weight)
            types = [state.nodes.type_names[t] if t >= 0 else "" for t in state.nodes.gpu_type]
            self.access = type_access(types, workload)
            self.cache.clear()

    def choose(self, state: ClusterState, shape: PodShape) -> Choice | None:
        self.observe(state, shape)
        entry = self.cache.get(shape)
        if entry is None:
            n = len(state.nodes)
            entry = _Entry(np.full(n, -1, dtype=np.int64), np.full(n, np.inf), np.full(n, -1, dtype=np.int64))
            self.cache[shape] = entry
        dirty = np.flatnonzero(entry.version != state.version)
        if len(dirty):
            self._refresh(state, shape, entry, dirty)
        best = entry.delta.min()
        if not np.isfinite(best):
            return None
        assert self.name_rank is not None
        ties = np.flatnonzero(entry.delta == best)
        if len(ties) > 1 and self.tie_fullest:
            left = np.maximum(state.free[ties], 0).sum(axis=1)
            ties = ties[left == left.min()]
        node = int(ties[np.argmin(self.name_rank[ties])])
        if self.core_view:
            self.window.append(replica_shape(shape, core_view=True))  # it will be placed
        if shape.num_gpu == 0:
            return node, ()
        if shape.shares_gpu:
            return node, (int(entry.gpu[node]),)
        return node, state.whole_gpus(node, shape.num_gpu)

    def _refresh(self, state: ClusterState, shape: PodShape, entry: _Entry,
                 dirty: npt.NDArray[np.int64]) -> None:
        assert self.work is not None and self.access is not None
        entry.version[dirty] = state.version[dirty]
        entry.delta[dirty] = np.inf
        rows = dirty[state.feasible(shape, dirty)]
        if len(rows) == 0:
            return
        free = state.free[rows]
        if shape.shares_gpu:
            usable = free >= shape.gpu_milli
            # GPUs of one node with equal free capacity give identical outcomes: keep the first.
            same = free[:, :, None] == free[:, None, :]
            earlier = np.tril(np.ones((free.shape[1], free.shape[1]), dtype=bool), k=-1)
            usable &= ~(same & earlier).any(axis=2)
            cand_row, cand_gpu = np.nonzero(usable)
            claim = np.zeros((len(cand_row), free.shape[1]), dtype=np.int64)
            claim[np.arange(len(cand_row)), cand_gpu] = shape.gpu_milli
        else:
            cand_row = np.arange(len(rows))
            cand_gpu = np.full(len(rows), -1)
            claim = np.zeros_like(free)
            if shape.num_gpu > 0:
                whole = free == FULL
                take = whole & (np.cumsum(whole, axis=1) <= shape.num_gpu)
                claim = np.where(take, FULL, 0).astype(np.int64)
        nodes = rows[cand_row]
        if self.core_view:
            host_free = np.stack([state.cpu_free[nodes], state.mem_free[nodes] * MIB], axis=1)
            claim_host = np.broadcast_to(np.array([shape.cpu, shape.mem * MIB], dtype=np.int64), host_free.shape)
        else:
            host_free = np.stack([state.cpu_free[nodes], state.mem_free[nodes]], axis=1)
            claim_host = np.broadcast_to(np.array([shape.cpu, shape.mem], dtype=np.int64), host_free.shape)
        delta = fragmentation_increase(free[cand_row], host_free, claim, claim_host,
                                       self.access[nodes], self.work)
        delta = np.round(delta, TIE_DECIMALS)
        # Per node, the smallest delta, then the lowest GPU index (candidates are in GPU order).
        order = np.lexsort((cand_gpu, delta, cand_row))
        first = order[np.r_[True, cand_row[order][1:] != cand_row[order][:-1]]]
        entry.delta[nodes[first]] = delta[first]
        entry.gpu[nodes[first]] = cand_gpu[first]
