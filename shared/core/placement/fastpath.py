"""Single-GPU candidates located once, scored again and again as the snapshot changes.

Fitting's candidates (``fit_gpus``) are placed once in a snapshot's ``[row, slot]`` layout as ``Positions``;
each replica of a burst then only re-checks which of them still have room (``still_fitting``) and scores
those (``score_positions``), without building or checking a single ``Candidate``. Property tests hold the
result to ``run_scoring`` on the same candidates.
"""

from __future__ import annotations

import numpy as np

from shared.core.placement.choice import gpu_decision
from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Decision, ModelSpec
from shared.core.placement.fitting import GpuBatch
from shared.core.placement.incremental import NOTHING_FITS, fitting_rows, pick_kept
from shared.core.placement.pipeline import GpuFit, score_gpus
from shared.core.placement.positions import Positions as Positions  # re-exported: callers import it from here
from shared.core.placement.profile import DEFAULT_PROFILE, Profile
from shared.core.placement.snapshot import BoolArray, ClusterSnapshot


def still_fitting(snapshot: ClusterSnapshot, pos: Positions, ram_claim: int, cpu_claim: int = 0) -> BoolArray:
    """``[row, slot]``: a candidate whose worker is present and not cordoned, and whose GPU is schedulable
    and (with the worker's RAM and CPU) still has room: what ``reconcile.still_fits`` checks, for every
    candidate."""
    return fitting_rows(snapshot, pos, slice(0, pos.mask.shape[0]), ram_claim, cpu_claim)


def score_positions(
    snapshot: ClusterSnapshot,
    model: ModelSpec,
    pos: Positions,
    ram_claim: int,
    strategy: str,
    profile: Profile = DEFAULT_PROFILE,
    cpu_claim: int = 0,
) -> Decision | None:
    """Score the located candidates that still fit and pick one, like ``run_scoring`` on the same candidates.

    None when the positions are stale (rows or slots moved since they were located), none still fits, or a
    configured scorer has no vectorised form (use ``run_scoring``).
    """
    if pos.layout != snapshot.layout:
        return None  # located before rows or slots moved (a reused row may now be another worker)
    ctx = PlacementContext(snapshot=snapshot, model=model, profile=profile)
    kept = pick_kept(ctx, pos, ram_claim, cpu_claim)
    if kept is NOTHING_FITS:
        return None
    if kept is not None:
        batch, picked = kept
        return gpu_decision(snapshot, model, batch, strategy, picked)
    return score_all_positions(snapshot, model, pos, ram_claim, strategy, profile, cpu_claim)


def score_all_positions(
    snapshot: ClusterSnapshot,
    model: ModelSpec,
    pos: Positions,
    ram_claim: int,
    strategy: str,
    profile: Profile = DEFAULT_PROFILE,
    cpu_claim: int = 0,
) -> Decision | None:
    """Every located candidate re-checked and scored in full, nothing kept from earlier decisions: the path
    ``score_positions`` takes when its kept rows do not apply, and the reference its property tests hold it to."""
    mask = still_fitting(snapshot, pos, ram_claim, cpu_claim)
    count = int(np.count_nonzero(mask))
    if count == 0:
        return None
    batch = GpuBatch(mask=mask, claims=pos.dense_claims, ram_claim=ram_claim, count=count, cpu_claim=cpu_claim)
    return score_gpus(snapshot, model, GpuFit(strategy=strategy, batch=batch), profile)
