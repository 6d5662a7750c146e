"""What follows the choice of a candidate, in one place: its breakdown, its ``Candidate``, its ``Decision``.

Three paths choose among a ``[row, slot]`` batch by different means (``pipeline``'s per-row maxima, its every-GPU
totals, and ``incremental``'s kept rows) and are held to the same decision to the bit by property tests; the tail
after the choice is this one code, so that those paths can differ only in how they choose. A multi-GPU set's or a
CPU-only worker's decision (``pipeline``) is made by the same ``decision``.
"""

from __future__ import annotations

import numpy as np

from shared.core.placement.domain import Candidate, Decision, FilterReport, ModelSpec
from shared.core.placement.fitting import GpuBatch
from shared.core.placement.snapshot import ClusterSnapshot, FloatArray

Parts = list[tuple[str, FloatArray]]
"""Each scorer's name and weighted scores over a batch: ``[row, slot]``, or ``[row, 1]`` for a per-worker column."""

GpuPick = tuple[int, int, float, dict[str, float]]
"""A chosen single-GPU candidate: its row, its slot, its total score and that total's breakdown."""

Scored = tuple[Candidate, float, dict[str, float]]
"""A chosen candidate of any shape, its total score and that total's breakdown."""


def breakdown_at(parts: Parts, r: int, s: int) -> dict[str, float]:
    """Each scorer's weighted score of the candidate at ``[r, s]`` (a per-worker column read at the row)."""
    return {name: float(values[r, s if values.shape[1] > 1 else 0]) for name, values in parts}


def gpu_candidate(snapshot: ClusterSnapshot, batch: GpuBatch, r: int, s: int, strategy: str) -> Candidate:
    """The candidate of ``batch`` at ``[r, s]``: that GPU of that worker, with the batch's claims."""
    claims = batch.claims
    claim = claims[r, s] if claims.shape == batch.mask.shape else np.broadcast_to(claims, batch.mask.shape)[r, s]
    return Candidate(worker=snapshot.name_of(r), gpu_indexes=(int(snapshot.g_index[r, s]),), vram_claims=(int(claim),),
                     ram_claim=batch.ram_claim, strategy=strategy, cpu_claim=batch.cpu_claim)


def gpu_decision(snapshot: ClusterSnapshot, model: ModelSpec, batch: GpuBatch, strategy: str,
                 picked: GpuPick) -> Decision:
    """The decision for ``picked`` among ``batch``'s candidates (all of them considered)."""
    r, s, total, breakdown = picked
    return decision(model, (gpu_candidate(snapshot, batch, r, s, strategy), total, breakdown), (), batch.count)


def decision(model: ModelSpec, scored: Scored, filters: tuple[FilterReport, ...], considered: int) -> Decision:
    """The decision for a chosen candidate of any shape, after ``filters``, among ``considered`` candidates."""
    chosen, total, breakdown = scored
    return Decision(model=model.name, candidate=chosen, score=total, breakdown=breakdown, filters=filters,
                    candidates_considered=considered)
