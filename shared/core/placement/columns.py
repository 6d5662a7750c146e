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
    """Single-GPU candidates of one model, column-wise: candidate k is GPU ``gpu_index[k]`` of worker
    ``workers[worker_of[k]]`` claiming ``claim[k]`` bytes of VRAM (and ``ram_claim`` of RAM).

    The columns are little-endian int32/int64 arrays as bytes: on the bus they cost a base64 copy
    instead of one JSON number each, which is what makes 8,000 candidates cheap to send and read.
    """

    model: str
    strategy: str
    workers: tuple[str, ...]  # distinct worker names
    worker_of: bytes  # int32 per candidate: index into ``workers``
    gpu_index: bytes  # int32 per candidate
    claim: bytes  # int64 per candidate
    ram_claim: int = 0

    def __len__(self) -> int:
        return len(self.claim) // 8

    def arrays(self) -> tuple[IntArray, IntArray, IntArray]:
        """(worker_of, gpu_index, claim) as int64 arrays."""
        return (
            np.frombuffer(self.worker_of, dtype="<i4").astype(np.int64),
            np.frombuffer(self.gpu_index, dtype="<i4").astype(np.int64),
            np.frombuffer(self.claim, dtype="<i8").astype(np.int64),
        )


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
    distinct, worker_of = np.unique(rows, return_inverse=True)
    return CandidateSet(
        model=model.name,
        strategy=fitted.strategy or "",
        workers=tuple([snapshot.name_of(r) for r in distinct.tolist()]),
        worker_of=worker_of.astype("<i4").tobytes(),
        gpu_index=snapshot.g_index[rows, slots].astype("<i4").tobytes(),
        claim=batch.claims[rows, slots].astype("<i8").tobytes(),
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
    for name in cset.workers:
        row = snapshot.row_of(name)
        if row is None:
            return None
        worker_rows.append(row)
    worker_of, gpu_index, claims = cset.arrays()
    rows = np.asarray(worker_rows, dtype=np.int64)[worker_of]
    match = snapshot.g_index[rows] == gpu_index[:, None]
    if not bool(match.any(axis=1).all()):
        return None
    return Positions(rows=rows, slots=match.argmax(axis=1).astype(np.int64), claims=claims)


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
    worker_of, gpu_index, claims = cset.arrays()
    return [
        Candidate(
            worker=cset.workers[w], gpu_indexes=(g,), vram_claims=(c,), ram_claim=cset.ram_claim,
            strategy=cset.strategy,
        )
        for w, g, c in zip(worker_of.tolist(), gpu_index.tolist(), claims.tolist(), strict=True)
    ]
