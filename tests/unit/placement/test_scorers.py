"""Scale-up scorers (spec §6) on hand-computed values, weights from the profile, deterministic ties."""

from __future__ import annotations

import pytest

from shared.core.placement.domain import (
    GIB,
    Candidate,
    Decision,
    ModelFile,
    ModelFileState,
    ModelSpec,
    PlacementStrategy,
    SubordinateWorker,
)
from shared.core.placement.pipeline import place, run_scoring
from shared.core.placement.profile import Profile, ScorerConfig
from shared.core.placement.scorers import SCORERS
from shared.core.placement.scorers.base import inv
from tests.unit.placement.helpers import NOW, ctx, gpu, instance, request, snapshot, worker

BINPACK = ModelSpec(name="m", placement_strategy=PlacementStrategy.BINPACK)
SPREAD = ModelSpec(name="m", placement_strategy=PlacementStrategy.SPREAD)


def cand(w, gpus=(0,), claims=(72,), ram=0, subs=()):
    return Candidate(worker=w, gpu_indexes=tuple(gpus), vram_claims=tuple(int(c * GIB) for c in claims),
                     ram_claim=int(ram * GIB), subordinates=tuple(subs))


def score(name, snap, candidates, model=SPREAD):
    return SCORERS[name]().score(ctx(snap, model), candidates)


# ------------------------------------------------------------------ binpack

@pytest.mark.parametrize(
    ("gpus", "ram_alloc", "c", "expected"),
    [
        ([gpu(0)], 64, cand("w", claims=(72,), ram=16), (25 + 90 * 2) / 3),  # (16/64·100 + 72/80·100·2)/3
        ([gpu(0), gpu(1, used=30)], 64, cand("w", (0, 1), (40, 40)), (80 * 2) / 3),  # max over GPUs: 40/50
        ([gpu(0, used=40)], 64, cand("w", claims=(72,)), 100.0),  # overcommit capped at 100
        ([], 128, cand("w", (), (), ram=32), 25.0),  # CPU only: 32/128 · 100
    ],
)
def test_binpack_formula(gpus, ram_alloc, c, expected):
    snap = snapshot(worker("w", gpus, ram=ram_alloc))
    assert score("binpack", snap, [c]) == [pytest.approx(expected)]


def test_binpack_multi_worker_weights_the_main_worker_five_times():
    snap = snapshot(worker("a", [gpu(0)]), worker("b", [gpu(0, total=160)]))
    sub = SubordinateWorker(worker="b", gpu_indexes=(0,), vram_claims=(72 * GIB,))
    # main 72/80 → 60; subordinate 72/160 → 30; (5·60 + 30)/6 = 55
    assert score("binpack", snap, [cand("a", subs=[sub])]) == [pytest.approx(55.0)]


def test_binpack_prefers_the_fuller_gpu():
    snap = snapshot(worker("w", [gpu(0), gpu(1, used=30)]))
    d = place(snap, BINPACK, NOW, request=request(10))
    assert isinstance(d, Decision) and d.candidate.gpu_indexes == (1,)


# ------------------------------------------------------------------ spread

def test_inv():
    assert inv(0, 0, 2) == 1.0 and inv(2, 0, 2) == 0.0 and inv(1, 0, 2) == 0.5 and inv(5, 3, 3) == 1.0


def spread_cluster():
    """A: model 0 / others 2; B: empty; C: model 1 / others 1 (all instances on GPU 1)."""
    return snapshot(
        worker("A"), worker("B"), worker("C"),
        instances=(instance("o1", "x", "A", (1,), 1), instance("o2", "y", "A", (1,), 1),
                   instance("m1", "m", "C", (1,), 1), instance("o3", "x", "C", (1,), 1)),
    )


def test_spread_when_some_worker_has_none_of_this_model():
    snap = spread_cluster()
    got = score("spread", snap, [cand("A"), cand("B"), cand("C"), cand("C", gpus=(1,))])
    w_a = 0.85 + 0.15 * 0.0  # current 0, others at the max of [0, 2]
    w_b = 0.85 + 0.15 * 1.0  # current 0, no others
    w_c = 0.45 + 0.35 * 0.0 + 0.20 * 0.5  # current 1 (max), others 1 of [0, 2]
    g_free = 1.0
    g_c1 = 1.0 / (1 + 1 + 0.2 * 1)  # GPU 1 of C holds one of this model and one other
    assert got == pytest.approx([100 * (0.85 * w_a + 0.15 * g_free), 100 * (0.85 * w_b + 0.15 * g_free),
                                 100 * (0.85 * w_c + 0.15 * g_free), 100 * (0.85 * w_c + 0.15 * g_c1)])


def test_spread_when_every_worker_already_has_this_model():
    snap = snapshot(worker("A"), worker("B"),
                    instances=(instance("m1", "m", "A", (1,), 1), instance("m2", "m", "B", (1,), 1),
                               instance("m3", "m", "B", (1,), 1), instance("o", "x", "B", (1,), 1)))
    got = score("spread", snap, [cand("A"), cand("B")])
    w_a = 0.50 + 0.25 * 1.0 + 0.15 * 1.0
    w_b = 0.50 + 0.25 * 0.0 + 0.15 * 0.0
    assert got == pytest.approx([100 * (0.85 * w_a + 0.15), 100 * (0.85 * w_b + 0.15)])


def test_spread_cpu_candidate_scores_the_worker_factor_only():
    snap = snapshot(worker("A", 0))
    assert score("spread", snap, [cand("A", (), ())]) == [pytest.approx(100.0)]


def test_spread_multi_gpu_averages_the_gpu_factor():
    snap = snapshot(worker("A", 2), instances=(instance("o", "x", "A", (1,), 1),))
    got = score("spread", snap, [cand("A", (0, 1), (1, 1))])
    g = (1.0 + 1.0 / 1.2) / 2
    assert got == pytest.approx([100 * (0.85 * 1.0 + 0.15 * g)])


# ------------------------------------------------------------------ locality, worker_fill, weights

def test_locality_is_five_times_the_fraction_of_ready_workers():
    snap = snapshot(worker("a"), worker("b"))
    snap.set_model_file(ModelFile(source="m", worker="a", state=ModelFileState.READY))
    snap.set_model_file(ModelFile(source="m", worker="b", state=ModelFileState.DOWNLOADING))
    sub = SubordinateWorker(worker="b", gpu_indexes=(0,), vram_claims=(GIB,))
    assert score("locality", snap, [cand("a"), cand("b"), cand("a", subs=[sub])]) == [5.0, 0.0, 2.5]


def test_worker_fill_is_the_taken_share_of_the_workers_vram_for_binpack_only():
    snap = snapshot(worker("a", [gpu(0), gpu(1, used=40)]))
    assert score("worker_fill", snap, [cand("a")], BINPACK) == [pytest.approx(0.25)]
    assert score("worker_fill", snap, [cand("a")], SPREAD) == [0.0]


def test_profile_weight_and_max_score_rescale_a_scorer():
    snap = snapshot(worker("a", 1))
    snap.set_model_file(ModelFile(source="m", worker="a", state=ModelFileState.READY))
    profile = Profile(scorers=(ScorerConfig(name="locality", weight=2.0, max_score=10.0),))
    d = run_scoring(snap, SPREAD, [cand("a")], profile)
    assert d.breakdown == {"locality": 20.0}  # 5 rescaled to 10, times weight 2


# ------------------------------------------------------------------ totals and ties

def test_total_is_the_sum_of_enabled_scorers_with_breakdown():
    snap = snapshot(worker("a", 1), worker("b", 1))
    snap.set_model_file(ModelFile(source="m", worker="b", state=ModelFileState.READY))
    d = run_scoring(snap, SPREAD, [cand("a"), cand("b")])
    assert d.candidate.worker == "b"
    assert d.breakdown == {"placement": 100.0, "locality": 5.0, "worker_fill": 0.0}
    assert d.score == 105.0


def test_ties_break_by_worker_name_then_gpu_indexes_not_input_order():
    snap = snapshot(worker("b", 2), worker("a", 2))
    d1 = run_scoring(snap, SPREAD, [cand("b", (1,)), cand("b", (0,)), cand("a", (1,)), cand("a", (0,))])
    d2 = run_scoring(snap, SPREAD, [cand("a", (0,)), cand("a", (1,)), cand("b", (0,)), cand("b", (1,))])
    assert d1.candidate == d2.candidate == cand("a", (0,))
    assert place(snap, SPREAD, NOW, request=request(10)).candidate.worker == "a"
