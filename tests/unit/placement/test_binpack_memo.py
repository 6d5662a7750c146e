"""Binpack's kept row scores: whatever events the snapshot takes between decisions, the fast path that rescores
only the rows that moved decides exactly as the reference path, and its scores are the full computation's to
the last bit."""

from __future__ import annotations

import msgspec
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from shared.core.placement import lru
from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import GIB, Decision, Gpu, ModelSpec, PlacementStrategy, ResourceRequest, Worker
from shared.core.placement.fastpath import Positions, score_positions
from shared.core.placement.fitting import GpuBatch
from shared.core.placement.pipeline import place, run_scoring
from shared.core.placement.profile import DEFAULT_PROFILE
from shared.core.placement.scorers.binpack import Binpack
from shared.core.placement.snapshot import ClusterSnapshot
from tests.unit.placement.test_fragmentation_memo import EVENTS, _apply
from tests.unit.placement.test_properties import NOW, SETTINGS, build, clusters, models


def _binpack(model: ModelSpec) -> ModelSpec:
    return msgspec.structs.replace(model, placement_strategy=PlacementStrategy.BINPACK)


def _decide_both_ways(snap: ClusterSnapshot, model: ModelSpec) -> Decision | None:
    fast = place(snap, model, NOW)
    assert fast == place(snap, model, NOW, exhaustive=True)
    return fast if isinstance(fast, Decision) else None


def _every_gpu(snap: ClusterSnapshot, claim: int, ram: int) -> GpuBatch:
    mask = np.array(snap.g_ok[: snap.rows], dtype=np.bool_)
    return GpuBatch(mask=mask, claims=np.full(mask.shape, claim, dtype=np.int64), ram_claim=ram,
                    count=int(mask.sum()))


def _kept_equals_fresh(snap: ClusterSnapshot, model: ModelSpec, claim: int, ram: int) -> None:
    ctx = PlacementContext(snapshot=snap, model=model, profile=DEFAULT_PROFILE)
    kept = Binpack.configured().score_batch(ctx, _every_gpu(snap, claim, ram))
    memo = dict(snap.memo)
    snap.memo.clear()
    fresh = Binpack.configured().score_batch(ctx, _every_gpu(snap, claim, ram))
    snap.memo.clear()
    snap.memo.update(memo)
    assert kept.tobytes() == fresh.tobytes()  # bit for bit, NaN-free and -0.0 alike


@SETTINGS
@given(clusters(), models(), st.lists(st.tuples(st.sampled_from(EVENTS), st.integers(0, 1000)), min_size=1,
                                     max_size=10))
def test_kept_row_scores_decide_as_the_reference_after_any_event_sequence(parts, model, events):
    snap = build(parts)
    model = _binpack(model)
    for serial, (event, pick) in enumerate(events):
        decision = _decide_both_ways(snap, model)
        _kept_equals_fresh(snap, model, claim=(pick % 7 + 1) << 30, ram=(pick % 3) << 30)
        _apply(snap, event, pick, decision, serial)
    _decide_both_ways(snap, model)


@SETTINGS
@given(clusters(), models(), st.integers(1, 6))
def test_located_candidates_rescored_replica_after_replica_decide_as_run_scoring(parts, model, replicas):
    """The scoring service's loop: candidates located once, each replica assumed before the next is scored."""
    from shared.core.placement.lifecycle import instance_from_decision
    from shared.core.placement.pipeline import fit_gpus, requirements, run_filters, run_fitting

    snap = build(parts)
    model = _binpack(model)
    req = requirements(model)
    if not isinstance(req, ResourceRequest):
        return
    survivors = run_filters(snap, model, NOW).survivors
    if fit_gpus(snap, model, req, survivors) is None:
        return  # not a single-GPU batch (e.g. partial offload's layer split): the service takes the candidate path
    fit = run_fitting(snap, model, req, survivors)
    singles = [c for c in fit.candidates if len(c.gpu_indexes) == 1 and not c.subordinates]
    if not singles or len(singles) != len(fit.candidates):
        return
    rows = np.array([snap.row_of(c.worker) for c in singles], dtype=np.int64)
    slots = np.array([snap.slot_map(c.worker)[c.gpu_indexes[0]] for c in singles], dtype=np.int64)  # type: ignore[index]
    pos = Positions.of(snap, rows, slots, np.array([c.vram_claims[0] for c in singles], dtype=np.int64))
    first = singles[0]
    for n in range(replicas):
        fast = score_positions(snap, model, pos, first.ram_claim, first.strategy, DEFAULT_PROFILE, first.cpu_claim)
        from shared.core.placement.reconcile import still_fits

        live = [c for c in singles if still_fits(snap, c)]
        if fast is None:
            assert not live
            return
        reference = run_scoring(snap, model, live)
        assert (fast.candidate, fast.score, fast.breakdown) == (reference.candidate, reference.score,
                                                               reference.breakdown)
        snap.upsert_instance(instance_from_decision(fast, f"r{n}", created_at=float(n)))


def test_a_claim_scored_often_keeps_its_row_scores_while_more_claims_than_are_kept_pass_through() -> None:
    """One claim scored between each of six others (more than the memos kept): its memo is never rebuilt."""
    snap = ClusterSnapshot.from_parts([
        Worker(name=f"w{i}", gpus=tuple(Gpu(index=g, vram_total=80 * GIB) for g in range(4)), ram_total=256 * GIB,
               last_heartbeat=NOW)
        for i in range(8)
    ])
    model = _binpack(ModelSpec(name="m", source="m", weight_bytes=2 * GIB))
    ctx = PlacementContext(snapshot=snap, model=model, profile=DEFAULT_PROFILE)
    binpack = Binpack.configured()

    def memo_of(claim: int) -> object:  # found in the one LRU store's form (``lru``), as binpack finds it
        return lru.first(snap.memo, "binpack.rows", lambda m: int(m.claims[0, 0]) == claim)

    binpack.score_batch(ctx, _every_gpu(snap, 4 * GIB, GIB))
    hot = memo_of(4 * GIB)
    for n in range(6):
        binpack.score_batch(ctx, _every_gpu(snap, (10 + n) * GIB, GIB))
        binpack.score_batch(ctx, _every_gpu(snap, 4 * GIB, GIB))
        assert memo_of(4 * GIB) is hot
