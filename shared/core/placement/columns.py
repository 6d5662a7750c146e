"""Single-GPU candidates as columns: the compact form the fitting → scoring hop carries on the bus.

Materialising thousands of ``Candidate`` structs, encoding them and decoding them again costs far more
than fitting and scoring themselves (1,000 workers × 8 GPUs: ~8,000 candidates, 1.4 MB of JSON). The
columns carry exactly the same information (worker, GPU index, VRAM claim, RAM claim, strategy) and the
scoring side rebuilds the core's ``GpuBatch`` from them directly, masked to what still fits its snapshot,
then scores it with the core's vectorised scorers: the same decision ``run_scoring`` makes on the same
candidates. Pure and clock-free, like the rest of the core. Multi-GPU, multi-worker and CPU placements keep
the regular ``FitResult`` path (callers fall back when these functions return None).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import numpy as np
import numpy.typing as npt

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Candidate, Decision, ModelSpec, ResourceRequest
from shared.core.placement.fitting import GpuBatch
from shared.core.placement.pipeline import _fit, _mask, _score_batch
from shared.core.placement.profile import DEFAULT_PROFILE, Profile
from shared.core.placement.snapshot import ClusterSnapshot

IntArray = npt.NDArray[np.int64]


class CandidateSet(msgspec.Struct, frozen=True, kw_only=True):
    """Single-GPU candidates of one model, column-wise (candidate k = ``workers[worker_of[k]]``...)."""

    model: str
    strategy: str
    workers: tuple[str, ...]  # distinct worker names
    worker_of: tuple[int, ...]  # per candidate: index into ``workers``
    gpu_index: tuple[int, ...]
    claim: tuple[int, ...]  # VRAM claim on that GPU
    ram_claim: int = 0

    def __len__(self) -> int:
        return len(self.claim)


def fit_columns(
    snapshot: ClusterSnapshot,
    model: ModelSpec,
    request: ResourceRequest,
    survivors: Sequence[str],
    profile: Profile = DEFAULT_PROFILE,
) -> CandidateSet | None:
    """Fitting's candidates as columns, when the winning strategy yields single-GPU candidates.

    None when it does not (or nothing fits): the caller then runs ``run_fitting`` for candidates or the
    explanation.
    """
    ctx = PlacementContext(snapshot=snapshot, model=model, profile=profile, request=request)
    fitted = _fit(ctx, _mask(snapshot, survivors), False)
    batch = fitted.batch
    if not isinstance(batch, GpuBatch) or len(batch) == 0:
        return None
    rows, slots = batch.positions()
    distinct: dict[int, int] = {}
    worker_of = []
    for r in rows.tolist():
        worker_of.append(distinct.setdefault(r, len(distinct)))
    return CandidateSet(
        model=model.name,
        strategy=fitted.strategy or "",
        workers=tuple(snapshot.name_of(r) for r in distinct),
        worker_of=tuple(worker_of),
        gpu_index=tuple(snapshot.g_index[rows, slots].tolist()),
        claim=tuple(batch.claims[rows, slots].tolist()),
        ram_claim=batch.ram_claim,
    )


@dataclass(frozen=True)
class Positions:
    """A CandidateSet located in one snapshot's ``[row, slot]`` layout."""

    rows: IntArray
    slots: IntArray
    claims: IntArray


def locate(snapshot: ClusterSnapshot, cset: CandidateSet) -> Positions | None:
    """Rows and slots of the candidates in ``snapshot``; None if a worker or GPU is unknown there."""
    worker_rows = []
    slot_maps = []
    for name in cset.workers:
        row = snapshot.row_of(name)
        slot_map = snapshot.slot_map(name)
        if row is None or slot_map is None:
            return None
        worker_rows.append(row)
        slot_maps.append(slot_map)
    slots = []
    for w, gpu in zip(cset.worker_of, cset.gpu_index, strict=True):
        slot = slot_maps[w].get(gpu)
        if slot is None:
            return None
        slots.append(slot)
    return Positions(
        rows=np.asarray(worker_rows, dtype=np.int64)[np.asarray(cset.worker_of, dtype=np.int64)],
        slots=np.asarray(slots, dtype=np.int64),
        claims=np.asarray(cset.claim, dtype=np.int64),
    )


def still_fitting(snapshot: ClusterSnapshot, pos: Positions, ram_claim: int) -> npt.NDArray[np.bool_]:
    """Per candidate: is its worker present and does its GPU (and worker RAM) still have room?"""
    ok = snapshot.w_present[pos.rows] & (snapshot.g_alloc[pos.rows, pos.slots] >= pos.claims)
    if ram_claim:
        ok &= snapshot.w_ram_alloc[pos.rows] >= ram_claim
    return np.asarray(ok, dtype=np.bool_)


def score_columns(
    snapshot: ClusterSnapshot,
    model: ModelSpec,
    cset: CandidateSet,
    pos: Positions,
    profile: Profile = DEFAULT_PROFILE,
) -> Decision | None:
    """Score the candidates that still fit and pick one, like ``run_scoring`` on the same candidates.

    None when none still fits or a configured scorer has no vectorised form (use ``run_scoring``).
    """
    ok = still_fitting(snapshot, pos, cset.ram_claim)
    count = int(ok.sum())
    if count == 0:
        return None
    shape = (snapshot.rows, snapshot.g_ok.shape[1])
    mask = np.zeros(shape, dtype=np.bool_)
    claims = np.zeros(shape, dtype=np.int64)
    rows, slots = pos.rows[ok], pos.slots[ok]
    mask[rows, slots] = True
    claims[rows, slots] = pos.claims[ok]
    ctx = PlacementContext(snapshot=snapshot, model=model, profile=profile)
    scored = _score_batch(ctx, GpuBatch(mask=mask, claims=claims, ram_claim=cset.ram_claim, count=count))
    if scored is None:
        return None
    r, s, total, breakdown = scored
    chosen = Candidate(
        worker=snapshot.name_of(r),
        gpu_indexes=(int(snapshot.g_index[r, s]),),
        vram_claims=(int(claims[r, s]),),
        ram_claim=cset.ram_claim,
        strategy=cset.strategy,
    )
    return Decision(
        model=model.name, candidate=chosen, score=total, breakdown=breakdown, candidates_considered=count
    )


def as_candidates(cset: CandidateSet) -> list[Candidate]:
    """The plain candidates (for the reference path and explanations)."""
    return [
        Candidate(
            worker=cset.workers[w], gpu_indexes=(g,), vram_claims=(c,), ram_claim=cset.ram_claim,
            strategy=cset.strategy,
        )
        for w, g, c in zip(cset.worker_of, cset.gpu_index, cset.claim, strict=True)
    ]
