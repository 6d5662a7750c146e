"""The paper's baseline policies, as its simulator scores them: random fit, best fit, dot product.

Node scores follow the simulator's Kubernetes score plugins: an integer in [0, 100] (so near-equal
nodes tie) and the scheduler picks uniformly among the top-scoring nodes. A sharing pod goes to the
fullest GPU that still fits it; a whole-GPU pod takes the lowest-indexed free GPUs (all equivalent).
"""

from __future__ import annotations

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


class BestFit:
    """Least remaining resources after placement: ``0.5 cpu_left/max_cpu + 0.5 gpu_left/max_gpu``."""

    name = "best-fit"

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def choose(self, state: ClusterState, shape: PodShape) -> Choice | None:
        rows = np.flatnonzero(state.feasible(shape))
        if len(rows) == 0:
            return None
        max_cpu = float(state.nodes.cpu.max())
        max_gpu = float(FULL * state.nodes.gpus.max())
        left = 0.5 * (state.cpu_free[rows] - shape.cpu) / max_cpu
        left += 0.5 * (_free_gpu_milli(state, rows) - shape.demand) / max_gpu
        scores = ((1.0 - left) * 100).astype(np.int64)
        node = _pick_top(scores, rows, self.rng)
        return node, tightest_gpu(state, node, shape)


class DotProduct:
    """Tetris-style alignment: the smaller the dot product of free and requested (CPU, GPU), the better."""

    name = "dot-product"

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def choose(self, state: ClusterState, shape: PodShape) -> Choice | None:
        rows = np.flatnonzero(state.feasible(shape))
        if len(rows) == 0:
            return None
        max_cpu = float(state.nodes.cpu.max())
        max_gpu = float(FULL * state.nodes.gpus.max())
        dot = (state.cpu_free[rows] / max_cpu) * (shape.cpu / max_cpu)
        dot += (_free_gpu_milli(state, rows) / max_gpu) * (shape.demand / max_gpu)
        scores = ((1.0 - dot / 2) * 100).astype(np.int64)
        node = _pick_top(scores, rows, self.rng)
        return node, tightest_gpu(state, node, shape)
