"""The scale-up scorer interface, and formula helpers that work on floats and numpy arrays alike.

The fast path scores single-GPU candidates as numpy columns; the reference path scores Candidate structs
one by one. Both evaluate the same expressions in the same order, so they agree to the last bit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Candidate
from shared.core.placement.fitting.cpu_only import RowBatch
from shared.core.placement.fitting.multi_gpu import GpuSetBatch
from shared.core.placement.fitting.single_gpu import GpuBatch
from shared.core.placement.plugin_args import Configurable
from shared.core.placement.snapshot import FloatArray, IntArray


@dataclass(frozen=True)
class SlotRows:
    """A scorer's per-GPU scores in row-local form: ``score(rows)`` gives the ``[row, slot]`` scores of just those
    rows, to the bit what ``score_batch`` gives for them, and reads nothing but those rows' own columns (the
    ones ``ClusterSnapshot.w_stamp`` covers) and what ``key`` names. So scores kept from an earlier decision
    stay exact for every row whose stamp has not moved, while ``key`` is unchanged (``incremental``)."""

    key: tuple[object, ...]
    score: Callable[[IntArray], FloatArray]
    score_row: Callable[[int], list[float]] | None = None  # optional: one row's scores as Python floats, same bits


class Scorer(Configurable, ABC):
    """Gives every candidate a score in ``[0, max_score]``; higher is better."""

    name: ClassVar[str]
    max_score: ClassVar[float]

    @abstractmethod
    def score(self, ctx: PlacementContext, candidates: Sequence[Candidate]) -> list[float]:
        """Reference: one score per candidate (normalisations may look at all of them)."""

    def score_batch(self, ctx: PlacementContext, batch: GpuBatch) -> FloatArray | None:
        """Fast path: a score matrix broadcastable to ``batch.mask`` (rows × GPU slots) for single-GPU
        candidates; None when not supported (the reference path is used then)."""
        return None

    def score_sets(self, ctx: PlacementContext, batch: GpuSetBatch) -> FloatArray | None:
        """Fast path: one score per multi-GPU candidate of ``batch``; None when not supported."""
        return None

    def slot_rows(self, ctx: PlacementContext, claims: IntArray, ram_claim: int, cpu_claim: int) -> SlotRows | None:
        """``score_batch`` in row-local form (see ``SlotRows``) for single-GPU candidates claiming ``claims``
        (full ``[row, slot]`` shape), when this scorer's per-GPU scores read only their own worker's row; None
        otherwise (anything normalised over the workers): decisions then take the full path."""
        return None

    def column_rows(self, ctx: PlacementContext) -> SlotRows | None:
        """A per-worker ``score_batch`` column (``(rows, 1)``) in row-local form: ``score(rows)`` gives those rows'
        values as ``(len(rows), 1)``. Kept between decisions like ``slot_rows``; None: computed afresh each time."""
        return None

    def score_rows(self, ctx: PlacementContext, batch: RowBatch) -> FloatArray | None:
        """Fast path: one score per CPU-only candidate (worker row) of ``batch``; None when not supported."""
        return None


def ratio(claim: int, allocatable: int) -> float:
    """claim / allocatable; 0 for no claim, 1 when nothing is allocatable."""
    if claim <= 0:
        return 0.0
    if allocatable <= 0:
        return 1.0
    return claim / allocatable


def ratio_array(claim: IntArray | int, allocatable: IntArray) -> FloatArray:
    """``ratio`` elementwise."""
    none = allocatable <= 0
    safe = np.where(none, 1, allocatable)
    result: FloatArray = np.where(claim <= 0, 0.0, np.where(none, 1.0, claim / safe))
    return result


def inv(value: float, lo: float, hi: float) -> float:
    """1 at the low end of ``[lo, hi]``, 0 at the high end; 1 when the range is empty."""
    if hi <= lo:
        return 1.0
    return 1.0 - (value - lo) / (hi - lo)


def inv_array(values: IntArray, lo: int, hi: int) -> FloatArray:
    """``inv`` elementwise for one range."""
    if hi <= lo:
        return np.ones(len(values), dtype=np.float64)
    result: FloatArray = 1.0 - (values - lo) / (hi - lo)
    return result
