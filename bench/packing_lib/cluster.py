"""Incremental cluster state for the replay: free milli-GPU per GPU, free CPU and memory per node.

One pod changes one node, so every node carries a version number; per-shape caches of scores are
refreshed only for the nodes whose version moved (see ``ShapeCache``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .trace import MAX_GPUS_PER_NODE, Nodes, Pods

FULL = 1000  # milli-GPU in one whole GPU
ABSENT = -1  # free value of a GPU slot the node does not have


@dataclass(frozen=True)
class PodShape:
    """What a pod asks for; pods with equal shapes are interchangeable for placement."""

    cpu: int
    mem: int
    num_gpu: int
    gpu_milli: int
    spec: str

    @property
    def demand(self) -> int:
        """Total GPU demand in milli-GPU."""
        return self.num_gpu * self.gpu_milli

    @property
    def shares_gpu(self) -> bool:
        """A fractional pod: one GPU, part of it."""
        return self.num_gpu == 1 and self.gpu_milli < FULL


def pod_shape(pods: Pods, i: int) -> PodShape:
    """The shape of the pod in row ``i``."""
    return PodShape(
        cpu=int(pods.cpu[i]),
        mem=int(pods.mem[i]),
        num_gpu=int(pods.num_gpu[i]),
        gpu_milli=int(pods.gpu_milli[i]) if pods.num_gpu[i] > 0 else 0,
        spec=pods.spec[i],
    )


@dataclass
class ClusterState:
    """Mutable per-node free resources.

    ``respect_memory`` (default on) checks memory as well as CPU and GPU, as the Kubernetes resource
    filter of the paper's simulator does.
    """

    nodes: Nodes
    respect_memory: bool = True
    free: npt.NDArray[np.int64] = field(init=False)
    cpu_free: npt.NDArray[np.int64] = field(init=False)
    mem_free: npt.NDArray[np.int64] = field(init=False)
    version: npt.NDArray[np.int64] = field(init=False)
    allocated_milli: int = 0
    _type_ok: dict[str, npt.NDArray[np.bool_]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.nodes)
        slots = np.arange(MAX_GPUS_PER_NODE)[None, :]
        self.free = np.where(slots < self.nodes.gpus[:, None], FULL, ABSENT).astype(np.int64)
        self.cpu_free = self.nodes.cpu.copy()
        self.mem_free = self.nodes.mem.copy()
        self.version = np.zeros(n, dtype=np.int64)

    @property
    def capacity_milli(self) -> int:
        """Cluster GPU capacity in milli-GPU."""
        return FULL * self.nodes.total_gpus

    def type_ok(self, shape: PodShape) -> npt.NDArray[np.bool_]:
        """Nodes whose GPU type the pod accepts (GPU pods only go to GPU nodes)."""
        key = f"{shape.spec}#{shape.num_gpu > 0}"
        mask = self._type_ok.get(key)
        if mask is None:
            if shape.num_gpu == 0:
                mask = np.ones(len(self.nodes), dtype=bool)
            elif not shape.spec:
                mask = self.nodes.gpus > 0
            else:
                allowed = {self.nodes.type_names.index(t) for t in shape.spec.split("|")
                           if t in self.nodes.type_names}
                mask = np.isin(self.nodes.gpu_type, sorted(allowed)) & (self.nodes.gpus > 0)
            self._type_ok[key] = mask
        return mask

    def feasible(self, shape: PodShape, rows: npt.NDArray[np.int64] | None = None) -> npt.NDArray[np.bool_]:
        """Which nodes (all, or the given rows) can host the pod now."""
        sel = slice(None) if rows is None else rows
        ok = self.type_ok(shape)[sel] & (self.cpu_free[sel] >= shape.cpu)
        if self.respect_memory:
            ok &= self.mem_free[sel] >= shape.mem
        if shape.num_gpu == 0:
            return ok
        free = self.free[sel]
        if shape.shares_gpu:
            return ok & (free >= shape.gpu_milli).any(axis=1)
        return ok & ((free == FULL).sum(axis=1) >= shape.num_gpu)

    def whole_gpus(self, node: int, count: int) -> tuple[int, ...]:
        """The lowest-indexed ``count`` entirely free GPUs of a node."""
        return tuple(int(g) for g in np.flatnonzero(self.free[node] == FULL)[:count])

    def allocate(self, node: int, gpus: tuple[int, ...], shape: PodShape) -> None:
        """Claim the pod's resources on a node (the caller checked feasibility)."""
        for g in gpus:
            if self.free[node, g] < shape.gpu_milli:
                raise ValueError(f"GPU {g} of node {node} cannot take {shape.gpu_milli} milli")
            self.free[node, g] -= shape.gpu_milli
        self.cpu_free[node] -= shape.cpu
        self.mem_free[node] -= shape.mem
        self.allocated_milli += shape.demand
        self.version[node] += 1

    def unallocated_gpus(self) -> float:
        """GPU capacity not allocated to any pod, in GPUs (the paper's metric)."""
        return (self.capacity_milli - self.allocated_milli) / FULL
