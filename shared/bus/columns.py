"""Single-GPU candidates as columns: the wire form of the fitting → scoring hop.

Materialising thousands of ``Candidate`` structs, encoding them and decoding them again costs far more
than fitting and scoring themselves (1,000 workers × 8 GPUs: ~8,000 candidates, 1.4 MB of JSON). The
columns carry exactly the same information (worker, GPU index, VRAM claim, RAM claim, strategy) in a few
bytes per worker: one 64-bit mask of candidate GPU indexes per worker, and the VRAM claim once when every
candidate claims the same (the common case: one model, one GPU type) or one per candidate otherwise. This
module only packs and unpacks: fitting packs the core's ``fit_gpus`` result, and the scoring side locates
the columns in its own snapshot (the core's ``Positions``) and scores them with ``score_positions``: the
same decision ``run_scoring`` makes on the same candidates. Multi-GPU, multi-worker and CPU placements, and
GPUs indexed 64 or above, keep the regular ``FitResult`` path (callers fall back when these functions
return None).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from shared.core.placement.domain import Candidate, Decision, ModelSpec, ResourceRequest
from shared.core.placement.profile import DEFAULT_PROFILE, Profile

if TYPE_CHECKING:
    # numpy and the core's fast path load where the columns are packed or unpacked, not where a message module
    # is imported: a CLI that only decodes events must not pay for them (issue 17, read commands within 0.5 s)
    import numpy as np
    import numpy.typing as npt

    from shared.core.placement.fastpath import Positions
    from shared.core.placement.snapshot import ClusterSnapshot

    IntArray = npt.NDArray[np.int64]
MASK_BITS = 64
_MASK_TYPES = {1: "<u1", 2: "<u2", 4: "<u4", 8: "<u8"}


def _mask_type(highest_index: int) -> str:
    """The narrowest mask type that holds bit ``highest_index``."""
    for size, dtype in _MASK_TYPES.items():
        if highest_index < 8 * size:
            return dtype
    raise ValueError(f"GPU index {highest_index} does not fit a mask")


class CandidateSet(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Single-GPU candidates of one model, column-wise.

    Worker ``workers[k]`` offers every GPU whose index is a set bit of ``gpus[k]``: one little-endian
    unsigned integer per worker, as narrow as the highest candidate index allows (one byte for 8-GPU
    workers). Candidates are ordered by worker, then GPU index; each claims ``claim`` bytes of VRAM, or
    ``claims[i]`` (int64 per candidate) when the claims differ, and ``ram_claim`` bytes of RAM.
    """

    model: str
    strategy: str
    workers: tuple[str, ...]  # distinct worker names
    gpus: bytes  # one mask per worker (len(gpus) // len(workers) bytes each): bit i = GPU index i
    claim: int = 0
    claims: bytes = b""  # int64 per candidate when claims differ, else empty
    ram_claim: int = 0
    cpu_claim: int = 0  # milli-cores

    def masks(self) -> npt.NDArray[np.uint64]:
        """The per-worker GPU masks."""
        import numpy as np

        width = len(self.gpus) // max(len(self.workers), 1)
        if width not in _MASK_TYPES:
            raise ValueError(f"GPU masks of {width} bytes per worker")
        return np.frombuffer(self.gpus, dtype=_MASK_TYPES[width]).astype(np.uint64)

    def __len__(self) -> int:
        import numpy as np

        return int(np.bitwise_count(self.masks()).sum())

    def arrays(self) -> tuple[IntArray, IntArray, IntArray]:
        """(worker position, GPU index, claim) per candidate, in candidate order."""
        import numpy as np

        bits = (self.masks()[:, None] >> np.arange(MASK_BITS, dtype=np.uint64)) & np.uint64(1)
        worker_of, gpu_index = np.nonzero(bits)
        if self.claims:
            claims = np.frombuffer(self.claims, dtype="<i8").astype(np.int64)
        else:
            claims = np.full(len(worker_of), self.claim, dtype=np.int64)
        return worker_of.astype(np.int64), gpu_index.astype(np.int64), claims


def _index_masks(index: IntArray, selected: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint64]:
    """Per row, the mask with bit ``index[row, slot]`` set for each selected slot (indexes below 64)."""
    import numpy as np

    bit = np.left_shift(np.uint64(1), np.where(selected, index, 0).astype(np.uint64))
    masks: npt.NDArray[np.uint64] = np.bitwise_or.reduce(np.where(selected, bit, np.uint64(0)), axis=1)
    return masks


def _index_order(index: IntArray, selected: npt.NDArray[np.bool_]) -> IntArray:
    """Per row, the slots by GPU index, selected ones first: candidate order within a worker."""
    import numpy as np

    order: IntArray = np.argsort(np.where(selected, index, MASK_BITS), axis=1, kind="stable")
    return order


def fit_columns(
    snapshot: ClusterSnapshot,
    model: ModelSpec,
    request: ResourceRequest,
    survivors: Sequence[str],
    profile: Profile = DEFAULT_PROFILE,
) -> CandidateSet | None:
    """Fitting's candidates as columns, when the winning strategy yields single-GPU candidates.

    None when it does not (or nothing fits, or a candidate GPU's index does not fit a mask): the caller
    then runs ``run_fitting`` for candidates or the explanation.
    """
    import numpy as np

    from shared.core.placement.pipeline import fit_gpus

    fitted = fit_gpus(snapshot, model, request, survivors, profile)
    if fitted is None:
        return None
    batch = fitted.batch
    rows = np.flatnonzero(batch.worker_mask())
    mask = batch.mask[rows]
    index = snapshot.g_index[rows]
    highest = int(index[mask].max())
    if highest >= MASK_BITS:
        return None
    gpus = _index_masks(index, mask)
    claimed = batch.claims[rows]
    picked = claimed[mask]
    uniform = bool((picked == picked[0]).all())
    if not uniform:  # per-candidate claims in candidate order: (worker, GPU index), whatever the slot order
        order = _index_order(index, mask)
        picked = np.take_along_axis(claimed, order, axis=1)[np.take_along_axis(mask, order, axis=1)]
    return CandidateSet(
        model=model.name,
        strategy=fitted.strategy,
        workers=tuple(snapshot.names_of(rows)),
        gpus=gpus.astype(_mask_type(highest)).tobytes(),
        claim=int(picked[0]) if uniform else 0,
        claims=b"" if uniform else picked.astype("<i8").tobytes(),
        ram_claim=batch.ram_claim,
        cpu_claim=batch.cpu_claim,
    )


def locate(snapshot: ClusterSnapshot, cset: CandidateSet) -> Positions | None:
    """Rows and slots of the candidates in ``snapshot``; None if a worker or GPU is unknown there."""
    import numpy as np

    from shared.core.placement.fastpath import Positions

    rows = snapshot.rows_of(cset.workers)
    if bool((rows < 0).any()):
        return None
    index = snapshot.g_index[rows]
    masks = cset.masks()
    # GPUs indexed past the mask width are never candidates (fitting sends those on the candidate path).
    maskable = (index >= 0) & (index < MASK_BITS)
    if bool(((masks & ~_index_masks(index, maskable)) != 0).any()):
        return None  # a candidate GPU this snapshot does not know
    bit_of = np.where(maskable, index, 0).astype(np.uint64)
    hit = maskable & ((masks[:, None] >> bit_of) & np.uint64(1)).astype(np.bool_)
    if not cset.claims:
        pos_w, slots = np.nonzero(hit)
        claims = np.full(len(pos_w), cset.claim, dtype=np.int64)
    else:  # candidates in (worker, GPU index) order, to line up with the per-candidate claims
        order = _index_order(index, hit)
        pos_w, k = np.nonzero(np.take_along_axis(hit, order, axis=1))
        slots = order[pos_w, k]
        claims = np.frombuffer(cset.claims, dtype="<i8").astype(np.int64)
    return Positions.of(snapshot, rows[pos_w], slots.astype(np.int64), claims)


def score_columns(
    snapshot: ClusterSnapshot,
    model: ModelSpec,
    cset: CandidateSet,
    pos: Positions,
    profile: Profile = DEFAULT_PROFILE,
) -> Decision | None:
    """Score the candidates that still fit and pick one, like ``run_scoring`` on the same candidates.

    None when ``pos`` is stale, none still fits or a configured scorer has no vectorised form (use
    ``run_scoring``).
    """
    from shared.core.placement.fastpath import score_positions

    return score_positions(snapshot, model, pos, cset.ram_claim, cset.strategy, profile, cset.cpu_claim)


def as_candidates(cset: CandidateSet) -> list[Candidate]:
    """The plain candidates (for the reference path and explanations)."""
    worker_of, gpu_index, claims = cset.arrays()
    return [
        Candidate(
            worker=cset.workers[w], gpu_indexes=(g,), vram_claims=(c,), ram_claim=cset.ram_claim,
            strategy=cset.strategy, cpu_claim=cset.cpu_claim,
        )
        for w, g, c in zip(worker_of.tolist(), gpu_index.tolist(), claims.tolist(), strict=True)
    ]
