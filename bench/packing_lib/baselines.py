"""The paper's baseline policies, as its simulator scores them: random fit, best fit, dot product.

Node scores follow the simulator's Kubernetes score plugins: an integer in [0, 100] (so near-equal
nodes tie) and the scheduler picks uniformly among the top-scoring nodes. A sharing pod goes to the
fullest GPU that still fits it; a whole-GPU pod takes the lowest-indexed free GPUs (all equivalent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from .cluster import FULL, ClusterState, PodShape

Choice = tuple[int, tuple[int, ...]]


class Policy(Protocol):
    """Chooses a node and GPUs for a pod, or None when nothing fits."""

    name: str

    def choose(self, state: ClusterState, shape: PodShape) -> Choice | None:
        """Decide where the pod goes; must not change ``state``."""
        ...


def tightest_gpu(state: ClusterState, node: int, shape: PodShape) -> tuple[int, ...]:
    """GPUs for the pod on ``node``: the fullest fitting GPU for a sharing pod, else free whole GPUs."""
    if shape.num_gpu == 0:
        return ()
    if shape.shares_gpu:
        free = state.free[node]
        fits = np.where(free >= shape.gpu_milli, free, FULL + 1)
        return (int(np.argmin(fits)),)
    return state.whole_gpus(node, shape.num_gpu)


def _pick_top(scores: npt.NDArray[np.int64], rows: npt.NDArray[np.int64], rng: np.random.Generator) -> int:
    best = rows[scores == scores.max()]
    return int(best[rng.integers(len(best))])


def _free_gpu_milli(state: ClusterState, rows: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    result: npt.NDArray[np.int64] = np.maximum(state.free[rows], 0).sum(axis=1)
    return result


class RandomFit:
    """Uniformly random feasible node; a sharing pod goes to a random fitting GPU."""

    name = "random"

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def choose(self, state: ClusterState, shape: PodShape) -> Choice | None:
        rows = np.flatnonzero(state.feasible(shape))
        if len(rows) == 0:
            return None
        node = int(rows[self.rng.integers(len(rows))])
        if shape.shares_gpu:
            gpus = np.flatnonzero(state.free[node] >= shape.gpu_milli)
            return node, (int(gpus[self.rng.integers(len(gpus))]),)
        return node, tightest_gpu(state, node, shape)


@dataclass(frozen=True)
class _Free:
    """Free CPU and GPU (milli) of the feasible nodes, with the cluster's largest node for scale."""

    cpu: npt.NDArray[np.int64]
    gpu: npt.NDArray[np.int64]
    max_cpu: float
    max_gpu: float


class _NodeScoring:
    """A policy that scores each feasible node in [0, 100] from its free CPU and GPU (each normalised by the
    cluster's largest node) and picks uniformly among the top ones."""

    name = ""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def choose(self, state: ClusterState, shape: PodShape) -> Choice | None:
        """The best-scoring feasible node and its tightest GPUs."""
        rows = np.flatnonzero(state.feasible(shape))
        if len(rows) == 0:
            return None
        max_cpu = float(state.nodes.cpu.max())
        max_gpu = float(FULL * state.nodes.gpus.max())
        free = _Free(cpu=state.cpu_free[rows], gpu=_free_gpu_milli(state, rows), max_cpu=max_cpu, max_gpu=max_gpu)
        scores = (self.score(free, shape) * 100).astype(np.int64)
        node = _pick_top(scores, rows, self.rng)
        return node, tightest_gpu(state, node, shape)

    def score(self, free: _Free, shape: PodShape) -> npt.NDArray[np.float64]:
        """Per feasible node: higher is better, within [0, 1]."""
        raise NotImplementedError


class BestFit(_NodeScoring):
    """Least remaining resources after placement: ``0.5 cpu_left/max_cpu + 0.5 gpu_left/max_gpu``."""

    name = "best-fit"

    def score(self, free: _Free, shape: PodShape) -> npt.NDArray[np.float64]:
        """1 − the share of CPU and GPU left over."""
        left = 0.5 * (free.cpu - shape.cpu) / free.max_cpu
        left += 0.5 * (free.gpu - shape.demand) / free.max_gpu
        return 1.0 - left  # type: ignore[no-any-return]


class DotProduct(_NodeScoring):
    """Tetris-style alignment: the smaller the dot product of free and requested (CPU, GPU), the better."""

    name = "dot-product"

    def score(self, free: _Free, shape: PodShape) -> npt.NDArray[np.float64]:
        """1 − half the dot product of free and requested shares."""
        dot = (free.cpu / free.max_cpu) * (shape.cpu / free.max_cpu)
        dot += (free.gpu / free.max_gpu) * (shape.demand / free.max_gpu)
        return 1.0 - dot / 2  # type: ignore[no-any-return]
