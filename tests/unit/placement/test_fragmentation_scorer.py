"""The fragmentation scorer: expected fragmentation, learned workload and scores on hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import GIB, Candidate, Category, Decision, ModelSpec
from shared.core.placement.pipeline import place
from shared.core.placement.profile import Profile, ScorerConfig
from shared.core.placement.registry import validate_profile
from shared.core.placement.scorers import SCORERS
from shared.core.placement.scorers.fragmentation import (
    Fragmentation,
    ReplicaShape,
    Workload,
    expected_fragmentation,
    fragmentation_increase,
    score_from_increase,
    type_access,
)
from tests.unit.placement.helpers import NOW, gpu, instance, request, snapshot, worker

HALF = ReplicaShape(gpus=1, milli=500)
WHOLE = ReplicaShape(gpus=1, milli=1000)
TWO = ReplicaShape(gpus=2, milli=1000)
NEEDS_RAM = ReplicaShape(gpus=1, milli=100, host=(200,))
T4_ONLY = ReplicaShape(gpus=1, milli=100, gpu_types=("T4",))


def frag(free, shapes, weights=None, host=(100,), product="L4"):
    work = Workload(shapes=tuple(shapes), weights=tuple(weights or [1.0 / len(shapes)] * len(shapes)))
    access = type_access([product], work)
    arrays = work.arrays(host_dims=1)
    return float(expected_fragmentation(np.array([free]), np.array([host]), access, arrays)[0])


@pytest.mark.parametrize(
    ("free", "shapes", "weights", "expected"),
    [
        # A half-GPU shape can use GPUs with >= 500 free: only the 200 is stranded.
        ([1000, 500, 200, -1], [HALF], None, 0.2),
        # A whole-GPU shape strands every partly used GPU: 500 + 200.
        ([1000, 500, 200, -1], [WHOLE], None, 0.7),
        # Weighted by how often each shape is seen: 0.5·0.2 + 0.5·0.7.
        ([1000, 500, 200, -1], [HALF, WHOLE], [0.5, 0.5], 0.45),
        # A shape that cannot be placed at all (two whole GPUs, one is free) strands everything: 1.7.
        ([1000, 500, 200, -1], [TWO], None, 1.7),
        # Short of host resources (RAM 200 wanted, 100 free): everything is stranded.
        ([1000, 500, 200, -1], [NEEDS_RAM], None, 1.7),
        # A GPU type the shape does not accept: everything is stranded.
        ([1000, 500, 200, -1], [T4_ONLY], None, 1.7),
        # A full worker has nothing to strand.
        ([0, 0, -1, -1], [HALF, WHOLE], [0.5, 0.5], 0.0),
    ],
)
def test_expected_fragmentation_on_hand_computed_values(free, shapes, weights, expected):
    assert frag(free, shapes, weights) == pytest.approx(expected)


def test_an_empty_workload_sees_no_fragmentation():
    work = Workload.learn([])
    assert len(work) == 0
    result = expected_fragmentation(np.array([[1000, 300]]), np.array([[0]]), np.ones((1, 0), dtype=bool),
                                    work.arrays(host_dims=1))
    assert result.tolist() == [0.0]


@pytest.mark.parametrize(
    ("gpu", "expected_delta"),
    [
        (1, -0.25),  # filling the half-free GPU: [1000, 0, 200] → 0.5·0.2 + 0.5·0.2 = 0.2, from 0.45
        (0, +0.25),  # breaking the whole GPU: [500, 500, 200] → 0.5·0.2 + 0.5·1.2 = 0.7, from 0.45
    ],
)
def test_fragmentation_increase_of_a_half_gpu_replica(gpu, expected_delta):
    work = Workload(shapes=(HALF, WHOLE), weights=(0.5, 0.5))
    free = np.array([[1000, 500, 200, -1]])
    claim = np.zeros((1, 4), dtype=np.int64)
    claim[0, gpu] = 500
    delta = fragmentation_increase(free, np.array([[100]]), claim, np.array([[0]]),
                                   type_access(["L4"], work), work.arrays(host_dims=1))
    assert delta.tolist() == [pytest.approx(expected_delta)]


def test_workload_learns_shape_frequencies_and_ignores_cpu_only_requests():
    recent = [HALF, HALF, WHOLE, ReplicaShape(gpus=0, milli=0, host=(8,)), HALF, WHOLE]
    work = Workload.learn(recent)
    assert work.shapes == (HALF, WHOLE)
    assert work.weights == pytest.approx((0.6, 0.4))


def test_workload_coverage_keeps_the_most_frequent_shapes():
    recent = [HALF] * 8 + [WHOLE] * 1 + [TWO] * 1
    assert Workload.learn(recent, coverage=0.8).shapes == (HALF,)
    assert Workload.learn(recent, coverage=0.8).weights == (1.0,)
    assert Workload.learn(recent, coverage=1.0).shapes == (HALF, WHOLE, TWO)  # ties in shape order


def test_workload_rejects_a_coverage_outside_zero_to_one():
    with pytest.raises(ValueError, match="coverage"):
        Workload.learn([HALF], coverage=0.0)


@pytest.mark.parametrize(("delta", "expected"), [(0.0, 50.0), (-0.1875, 100 / (1 + math.exp(-0.1875))),
                                                 (1000.0, 100 / (1 + math.exp(50)))])
def test_score_is_a_decreasing_sigmoid_of_the_increase(delta, expected):
    assert score_from_increase(delta, 100.0) == pytest.approx(expected)


def test_scorer_is_registered_and_selectable_in_a_profile():
    assert SCORERS["fragmentation"] is Fragmentation
    validate_profile(Profile(name="frag", scorers=(ScorerConfig(name="fragmentation"),)))


FRAG = Profile(name="frag", scorers=(ScorerConfig(name="fragmentation"),))
EMBEDDING = ModelSpec(name="emb", categories=(Category.EMBEDDING,))


def gap_cluster():
    # w1/gpu0 holds a 50 GiB replica (625 milli of 80 GiB); the request is 30 GiB (375 milli).
    return snapshot(worker("w1", [gpu(0), gpu(1)]), instances=(instance("a", "x", "w1", (0,), claim=50),))


def test_reference_scores_match_hand_computed_values():
    # Workload: the 625 shape (instance) and the 375 shape (the request), 0.5 each.
    # gpu0 → [0, 1000]: nothing stranded, from 0.5·375 milli: increase −0.1875 GPU.
    # gpu1 → [375, 625]: both shapes still fit, gpu0 stays stranded for the 625 shape: increase 0.
    snap = gap_cluster()
    ctx = PlacementContext(snapshot=snap, model=EMBEDDING, profile=FRAG, now=NOW, request=request(30))
    cands = [Candidate(worker="w1", gpu_indexes=(g,), vram_claims=(30 * GIB,)) for g in (0, 1)]
    scores = Fragmentation().score(ctx, cands)
    assert scores == [pytest.approx(100 / (1 + math.exp(-0.1875))), pytest.approx(50.0)]


@pytest.mark.parametrize("exhaustive", [False, True])
def test_place_with_the_fragmentation_profile_fills_the_gap(exhaustive):
    result = place(gap_cluster(), EMBEDDING, NOW, FRAG, request=request(30), exhaustive=exhaustive)
    assert isinstance(result, Decision)
    assert (result.candidate.worker, result.candidate.gpu_indexes) == ("w1", (0,))
    assert result.breakdown["fragmentation"] == pytest.approx(100 / (1 + math.exp(-0.1875)))


def test_fast_path_and_reference_agree_on_every_candidate():
    snap = snapshot(worker("w1", [gpu(0), gpu(1)]), worker("w2", [gpu(0, total=48, product="L40S")]),
                    instances=(instance("a", "x", "w1", (0,), claim=50), instance("b", "y", "w2", (0,), claim=10)))
    for vram in (5, 20, 30, 60):
        fast = place(snap, EMBEDDING, NOW, FRAG, request=request(vram))
        slow = place(snap, EMBEDDING, NOW, FRAG, request=request(vram), exhaustive=True)
        assert isinstance(fast, Decision) and isinstance(slow, Decision)
        assert fast.candidate == slow.candidate
        assert fast.score == pytest.approx(slow.score)


@pytest.mark.parametrize(
    ("free", "cpu_free", "expected_extra"),
    [
        # 3 free GPUs, CPU for 1 (8 cores per GPU): 2 GPUs' worth stranded by CPU, times the weight 0.5.
        ([1000, 1000, 1000, 0], 8000, 0.5 * 2.0),
        # CPU for all three: nothing extra.
        ([1000, 1000, 1000, 0], 24000, 0.0),
        # No CPU at all: every free GPU (1.5) is host-stranded.
        ([1000, 500, 0, 0], 0, 0.5 * 1.5),
    ],
)
def test_host_weight_adds_the_gpus_a_workers_cpu_can_no_longer_back(free, cpu_free, expected_extra):
    shape = ReplicaShape(gpus=1, milli=1000, host=(8000, 0))  # 8 cores per whole GPU
    work = Workload(shapes=(shape,), weights=(1.0,))
    access = type_access(["L4"], work)
    host = np.array([[cpu_free, 10**12]])
    plain = expected_fragmentation(np.array([free]), host, access, work.arrays(host_dims=2))[0]
    weighted = expected_fragmentation(np.array([free]), host, access, work.arrays(host_dims=2, host_weight=0.5))[0]
    assert weighted - plain == pytest.approx(expected_extra)


def test_host_weight_zero_is_fgds_measure_alone():
    profile = validate_profile(Profile(scorers=(ScorerConfig(name="fragmentation", args={"host_weight": 0}),)))
    assert SCORERS["fragmentation"].configured(profile.scorers[0].args).host_weight == 0.0  # type: ignore[attr-defined]


def test_single_slot_fragmentation_equals_the_full_state_computation_bit_for_bit() -> None:
    import numpy as np

    from shared.core.placement.scorers.fragmentation import (
        ReplicaShape,
        Workload,
        expected_fragmentation,
        single_slot_fragmentation,
    )

    rng = np.random.default_rng(7)
    for host_weight in (0.0, 0.5):
        rows, width = 40, 8
        free = rng.integers(-1, 1001, size=(rows, width))
        after_slot = np.where(free < 0, -1, np.maximum(free - rng.integers(0, 1001, size=(rows, width)), 0))
        host = rng.integers(0, 64_000, size=(rows, 2))
        work = Workload.learn([ReplicaShape(gpus=int(g), milli=int(m), host=(int(c), int(r)))
                               for g, m, c, r in zip(rng.integers(1, 5, 30), rng.integers(1, 1001, 30),
                                                     rng.integers(0, 8_000, 30), rng.integers(0, 16_000, 30),
                                                     strict=True)])
        arrays = work.arrays(host_dims=2, host_weight=host_weight)
        access = rng.random((rows, len(work))) > 0.2
        eye = np.eye(width, dtype=bool)
        full = np.where(eye[None, :, :], after_slot[:, :, None], free[:, None, :])
        expected = expected_fragmentation(full, np.broadcast_to(host[:, None, :], (rows, width, 2)),
                                          np.broadcast_to(access[:, None, :], (rows, width, len(work))), arrays)
        got = single_slot_fragmentation(free, after_slot, host, access, arrays)
        assert np.array_equal(got, expected)


def test_recent_placed_is_the_newest_instances_on_a_worker_oldest_first() -> None:
    import msgspec

    from shared.core.placement.domain import Instance, InstanceState
    from shared.core.placement.snapshot import ClusterSnapshot

    snap = ClusterSnapshot()
    for k, t in enumerate([5.0, 1.0, 3.0, 4.0]):
        snap.upsert_instance(Instance(id=f"i{k}", model="m", state=InstanceState.PENDING, created_at=t))
    assert snap.recent_placed(10) == []  # none sits on a worker yet
    for k in range(4):
        inst = snap.instance(f"i{k}")
        assert inst is not None
        snap.upsert_instance(msgspec.structs.replace(inst, worker="w"))
    snap.remove_instance("i3")
    assert [i.id for i in snap.recent_placed(2)] == ["i2", "i0"]
    assert [i.id for i in snap.recent_placed(10)] == ["i1", "i2", "i0"]

