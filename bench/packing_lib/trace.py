"""Loading the Alibaba cluster-trace-gpu-v2023 ("openb") node and pod lists into arrays.

Units: CPU in milli-cores, memory in MiB, GPU in milli-GPU (1000 = one whole GPU). A pod asks for
``num_gpu`` GPUs with ``gpu_milli`` milli each (``gpu_milli < 1000`` only when ``num_gpu == 1``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from shared.paths import data_dir

TRACE_DIR = "alibaba_gpu_v2023"
POD_LISTS: tuple[str, ...] = ("default", "gpushare40", "multigpu20", "gpuspec10")
MAX_GPUS_PER_NODE = 8

# Per-GPU VRAM (GiB) of the trace's GPU types. P100/T4/V100/A10 are datasheet values (see
# ../shared/data/gpu_specs); G1/G2/G3 are undisclosed by Alibaba, so these are documented placeholders.
# Packing results do not depend on them: a sharing pod claims a *fraction* of its GPU's VRAM.
VRAM_GIB: dict[str, int] = {
    "P100": 16,
    "T4": 16,
    "V100M16": 16,
    "V100M32": 32,
    "A10": 24,
    "G1": 24,
    "G2": 32,
    "G3": 80,
}

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Nodes:
    """The cluster: one row per node (CPU-only nodes have ``gpus == 0`` and type index -1)."""

    names: tuple[str, ...]
    cpu: IntArray
    mem: IntArray
    gpus: IntArray
    gpu_type: IntArray  # index into ``type_names``; -1 for CPU-only nodes
    type_names: tuple[str, ...]

    @property
    def total_gpus(self) -> int:
        """Number of GPUs in the cluster."""
        return int(self.gpus.sum())

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class Pods:
    """A pod list: one row per pod, in file order."""

    names: tuple[str, ...]
    cpu: IntArray
    mem: IntArray
    num_gpu: IntArray
    gpu_milli: IntArray  # per GPU; 0 for CPU-only pods
    spec: tuple[str, ...]  # "" or "T4|P100" ...

    @property
    def gpu_demand(self) -> IntArray:
        """Total GPU demand of each pod, in milli-GPU."""
        return self.num_gpu * self.gpu_milli

    def __len__(self) -> int:
        return len(self.names)

    def take(self, order: IntArray) -> Pods:
        """The pods at the given row indexes (repeats allowed), in that order."""
        return Pods(
            names=tuple(self.names[i] for i in order),
            cpu=self.cpu[order],
            mem=self.mem[order],
            num_gpu=self.num_gpu[order],
            gpu_milli=self.gpu_milli[order],
            spec=tuple(self.spec[i] for i in order),
        )


def trace_dir() -> Path:
    """Folder holding the trace's CSV files."""
    return data_dir() / TRACE_DIR


def load_nodes(path: Path | None = None) -> Nodes:
    """Read the node list (all nodes, CPU-only ones included, as the paper's simulator does)."""
    path = path or trace_dir() / "openb_node_list_all_node.csv"
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    type_names = tuple(sorted({r["model"] for r in rows if r["model"]}))
    index = {t: i for i, t in enumerate(type_names)}
    return Nodes(
        names=tuple(r["sn"] for r in rows),
        cpu=np.array([int(r["cpu_milli"]) for r in rows], dtype=np.int64),
        mem=np.array([int(r["memory_mib"]) for r in rows], dtype=np.int64),
        gpus=np.array([int(r["gpu"]) for r in rows], dtype=np.int64),
        gpu_type=np.array([index[r["model"]] if r["model"] else -1 for r in rows], dtype=np.int64),
        type_names=type_names,
    )


def load_pods(pod_list: str = "default", path: Path | None = None) -> Pods:
    """Read one pod list; ``multigpu20`` has no ``gpu_spec`` column, which means no constraint."""
    path = path or trace_dir() / f"openb_pod_list_{pod_list}.csv"
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return Pods(
        names=tuple(r["name"] for r in rows),
        cpu=np.array([int(r["cpu_milli"]) for r in rows], dtype=np.int64),
        mem=np.array([int(r["memory_mib"]) for r in rows], dtype=np.int64),
        num_gpu=np.array([int(r["num_gpu"]) for r in rows], dtype=np.int64),
        gpu_milli=np.array([int(r["gpu_milli"]) for r in rows], dtype=np.int64),
        spec=tuple((r.get("gpu_spec") or "").strip() for r in rows),
    )


def inflate(pods: Pods, capacity_milli: int, ratio: float, seed: int) -> Pods:
    """The paper's workload inflation: the pod list plus pods drawn from it with replacement (seeded)
    until the total GPU demand reaches ``ratio`` x capacity, then shuffled with the same seed."""
    rng = np.random.default_rng(seed)
    demand = pods.gpu_demand
    target = ratio * capacity_milli
    total = int(demand.sum())
    extra: list[int] = []
    gpu_rows = np.flatnonzero(demand > 0)
    if len(gpu_rows) == 0:
        raise ValueError("the pod list asks for no GPUs")
    while total < target:
        # Draw in batches: a cheap way to keep the seeded stream identical to one-at-a-time draws.
        for i in rng.integers(0, len(pods), size=256):
            if total >= target:
                break
            extra.append(int(i))
            total += int(demand[i])
    order = np.concatenate([np.arange(len(pods), dtype=np.int64), np.array(extra, dtype=np.int64)])
    rng.shuffle(order)
    return pods.take(order)
