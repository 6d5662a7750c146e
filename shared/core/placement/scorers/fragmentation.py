"""Fragmentation scorer: prefer the placement that strands the least GPU capacity for the workload.

The idea follows "fragmentation gradient descent" (Weng et al., USENIX ATC'23). For a worker and one
replica *shape* (GPU count, per-GPU share of a GPU, host demands such as RAM, allowed GPU types), the
worker's **fragment** is the free GPU capacity that shape cannot use: all of it when the shape cannot be
placed on the worker at all, otherwise the free capacity of the GPUs too full to take one of its
per-GPU parts. The worker's **expected fragmentation** weighs the fragment of every shape by how often
the cluster sees that shape. A candidate scores by how little it raises the expected fragmentation of
its worker(s): ``max_score x sigmoid(-delta)``, delta in GPUs.

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
    worker's other resources, in the same order as the worker vectors given to the kernels (Gantry:
    RAM bytes; the trace replay: CPU and memory); ``gpu_types`` the GPU products it accepts (empty: any).
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

    def arrays(self, host_dims: int) -> WorkloadArrays:
        """The workload as arrays, host demands padded with zeros to ``host_dims`` entries."""
        host = np.zeros((len(self.shapes), host_dims), dtype=np.int64)
        for i, s in enumerate(self.shapes):
            if len(s.host) > host_dims:
                raise ValueError(f"shape {s} has more host demands than the workers report ({host_dims})")
            host[i, : len(s.host)] = s.host
        return WorkloadArrays(
            gpus=np.array([s.gpus for s in self.shapes], dtype=np.int64),
            milli=np.array([s.milli for s in self.shapes], dtype=np.int64),
            host=host,
            weights=np.array(self.weights, dtype=np.float64),
        )


@dataclass(frozen=True)
class WorkloadArrays:
    """Column arrays of a workload: M shapes."""

    gpus: IntArray  # (M,)
    milli: IntArray  # (M,)
    host: IntArray  # (M, H)
    weights: FloatArray  # (M,)


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


def score_from_increase(delta: float, max_score: float) -> float:
    """Map a fragmentation increase (GPUs) to a score in (0, max_score): smaller increase, higher."""
    # Clamp the exponent: a huge increase should score ~0, not overflow.
    return max_score / (1.0 + math.exp(min(max(delta, -50.0), 50.0)))
