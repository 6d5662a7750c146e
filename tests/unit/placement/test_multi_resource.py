"""CPU beside GPUs and RAM (issue 19): fitting checks it, the default strategy scores it, GPUStack's don't."""

from __future__ import annotations

import pytest

from shared.core.placement.domain import (
    GIB,
    Decision,
    Instance,
    InstanceState,
    ModelSpec,
    PlacementStrategy,
    ResourceRequest,
    Unschedulable,
)
from shared.core.placement.lifecycle import instance_from_decision
from shared.core.placement.pipeline import place
from shared.core.placement.profile import Profile, ScorerConfig
from shared.core.placement.snapshot import CPU_UNCHECKED
from tests.unit.placement.helpers import NOW, snapshot, worker

CORES = 1000  # milli-cores per core
WHOLE_GPU = ResourceRequest(vram=1, gpu_memory_utilization=0.9, gpu_count=1, cpu=8 * CORES)


def held(iid: str, name: str, index: int, cpu: int) -> Instance:
    """A replica holding 90% of one H100 and ``cpu`` milli-cores."""
    return Instance(id=iid, model="other", state=InstanceState.RUNNING, worker=name, gpu_indexes=(index,),
                    vram_claims=(72 * GIB,), cpu_claim=cpu, created_at=float(index))


def cpu_tight_cluster():
    """w1 (first by name) has 2 free GPUs but CPU for one more 8-core replica; w2 has GPUs and CPU to spare.

    Recent replicas: an 8-core one on w1 and a 1-core one on w2, so the workload has both shapes.
    """
    return snapshot(
        worker("w1", 3, cpu_total=16 * CORES),
        worker("w2", 4, cpu_total=64 * CORES),
        instances=(held("a", "w1", 0, 8 * CORES), held("b", "w2", 0, 1 * CORES)),
    )


def hostable(snap, request: ResourceRequest) -> int:
    """How many more replicas of ``request`` the cluster takes, placed one after another."""
    count = 0
    while isinstance(d := place(snap, ModelSpec(name="probe", placement_strategy=PlacementStrategy.BINPACK), NOW,
                                request=request), Decision):
        snap.upsert_instance(instance_from_decision(d, f"probe-{count}"))
        count += 1
    return count


def test_cpu_exhausted_worker_is_not_chosen_when_a_placement_elsewhere_leaves_room_for_more():
    decision = place(cpu_tight_cluster(), ModelSpec(name="m"), NOW, request=WHOLE_GPU)
    assert isinstance(decision, Decision)
    assert decision.candidate.worker == "w2"
    # the claim: after the default's choice the cluster hosts more 1-core GPU replicas than after w1
    small = ResourceRequest(vram=1, gpu_memory_utilization=0.9, gpu_count=1, cpu=1 * CORES)
    after = {}
    for name in ("w1", "w2"):
        snap = cpu_tight_cluster()
        snap.upsert_instance(instance_from_decision(decision, "new") if name == "w2" else
                             held("new", "w1", 1, 8 * CORES))
        after[name] = hostable(snap, small)
    assert after["w2"] > after["w1"]


def test_named_binpack_keeps_gpustacks_formula_and_ignores_cpu():
    model = ModelSpec(name="m", placement_strategy=PlacementStrategy.BINPACK)
    decision = place(cpu_tight_cluster(), model, NOW, request=WHOLE_GPU)
    assert isinstance(decision, Decision)
    assert decision.candidate.worker == "w1"  # fuller worker by VRAM; CPU is not part of GPUStack's binpack


def test_binpack_with_a_cpu_weight_counts_the_cpu_ratio_as_fullness():
    profile = Profile(name="cpu-binpack", scorers=(ScorerConfig(name="binpack", args={"cpu_weight": 1.0}),))
    snap = snapshot(worker("w1", 1, cpu_total=64 * CORES), worker("w2", 1, cpu_total=9 * CORES))
    decision = place(snap, ModelSpec(name="m"), NOW, profile, request=WHOLE_GPU)
    assert isinstance(decision, Decision) and decision.candidate.worker == "w2"
    plain = place(snap, ModelSpec(name="m"), NOW, Profile(scorers=(ScorerConfig(name="binpack"),)), request=WHOLE_GPU)
    assert isinstance(plain, Decision) and plain.candidate.worker == "w1"  # tie → name without the CPU term


@pytest.mark.parametrize("exhaustive", [False, True])
def test_a_worker_without_the_cpu_is_not_a_candidate(exhaustive):
    snap = snapshot(worker("w1", 2, cpu_total=4 * CORES), worker("w2", 2, cpu_total=16 * CORES, cpu_used=10 * CORES))
    verdict = place(snap, ModelSpec(name="m"), NOW, request=WHOLE_GPU, exhaustive=exhaustive)
    assert isinstance(verdict, Unschedulable)
    assert place(snapshot(worker("w1", 2, cpu_total=8 * CORES)), ModelSpec(name="m"), NOW, request=WHOLE_GPU,
                 exhaustive=exhaustive).candidate.worker == "w1"  # type: ignore[union-attr]


def test_a_worker_that_reports_no_cpu_count_is_never_short_of_cpu():
    snap = snapshot(worker("w1", 1))
    assert snap.cpu_allocatable("w1") == CPU_UNCHECKED
    decision = place(snap, ModelSpec(name="m"), NOW, request=WHOLE_GPU)
    assert isinstance(decision, Decision) and decision.candidate.cpu_claim == 8 * CORES


def test_cpu_claims_count_against_the_worker_whatever_the_reported_use():
    snap = snapshot(worker("w1", 2, cpu_total=16 * CORES, cpu_used=2 * CORES),
                    instances=(held("a", "w1", 0, 5 * CORES),))
    assert snap.cpu_allocatable("w1") == 11 * CORES  # max(claims, reported use)
    snap.upsert_instance(held("b", "w1", 1, 6 * CORES))
    assert snap.cpu_allocatable("w1") == 5 * CORES
    snap.remove_instance("a")
    assert snap.cpu_allocatable("w1") == 10 * CORES


def test_the_decision_carries_the_cpu_claim_into_the_instance():
    decision = place(snapshot(worker("w1", 1, cpu_total=64 * CORES)), ModelSpec(name="m"), NOW, request=WHOLE_GPU)
    assert isinstance(decision, Decision)
    assert instance_from_decision(decision, "i").cpu_claim == 8 * CORES


def test_a_negative_cpu_claim_is_rejected_with_a_reason():
    verdict = place(snapshot(worker("w1", 1)), ModelSpec(name="m", weight_bytes=GIB, cpu_claim=-1), NOW)
    assert isinstance(verdict, Unschedulable) and "must not be negative" in verdict.message
