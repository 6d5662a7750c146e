"""Explanations (spec §5): an unschedulable verdict names the requirement and the best the cluster offers."""

from __future__ import annotations

from shared.core.placement.domain import GIB, Decision, ModelSpec, Unschedulable
from shared.core.placement.pipeline import place
from tests.unit.placement.helpers import NOW, gpu, request, snapshot, worker


def test_message_has_the_spec_shape_with_two_decimal_gib():
    snap = snapshot(
        worker("w1", [gpu(0, used=75), gpu(1, used=76)]),
        worker("w2", [gpu(0, used=79), gpu(1, used=78)]),
        worker("w3", [gpu(0, used=71), gpu(1, total=82, used=82 - 12.3)]),
    )
    verdict = place(snap, ModelSpec(name="m"), NOW, request=request(19, u=0.9))
    assert isinstance(verdict, Unschedulable)
    assert verdict.message == (
        "needs ≈19.00 GiB VRAM per replica; largest allocatable GPU: 12.30 GiB (w3/gpu1, 15%); "
        "0 of 6 GPUs have the 90% utilization headroom"
    )
    assert [r.plugin for r in verdict.reasons] == ["manual", "single_gpu", "multi_gpu", "multi_worker",
                                                   "partial_offload", "cpu_only"]


def test_verdict_carries_the_filter_counts_when_no_worker_survives():
    snap = snapshot(worker("w1", last_heartbeat=0.0), worker("w2", cluster="edge"))
    verdict = place(snap, ModelSpec(name="m"), NOW, request=request(10))
    assert isinstance(verdict, Unschedulable)
    assert verdict.message.startswith("no worker passed the filters: cluster kept 1 of 2, ")
    assert "status kept 0 of 1" in verdict.message and "w1: NOT_READY" in verdict.message
    assert [r.filter for r in verdict.filters][-1] == "status"


def test_multi_gpu_shortfall_names_the_best_worker_and_cordoned_gpus():
    snap = snapshot(worker("w1", [gpu(0), gpu(1, schedulable=False)]), worker("w2", [gpu(0, used=10)]))
    verdict = place(snap, ModelSpec(name="m"), NOW, request=request(100, u=0.9))
    assert isinstance(verdict, Unschedulable)
    assert "best worker: 72.00 GiB claimable at 90% over 1 GPUs (w1)" in verdict.message
    assert "1 GPUs cordoned" in verdict.message


def test_decision_carries_its_score_breakdown_and_filter_reports():
    d = place(snapshot(worker("w1")), ModelSpec(name="m", weight_bytes=5 * GIB), NOW)
    assert isinstance(d, Decision)
    assert set(d.breakdown) == {"placement", "locality", "worker_fill"}
    assert d.score == sum(d.breakdown.values())
    assert len(d.filters) == 6 and d.candidates_considered == 2


def test_an_empty_cluster_says_so():
    from shared.core.placement.snapshot import ClusterSnapshot

    verdict = place(ClusterSnapshot(), ModelSpec(name="m"), NOW, request=request(10))
    assert isinstance(verdict, Unschedulable) and verdict.message == "no workers in the cluster"


def test_multi_worker_shortfall_names_the_closest_combination_and_what_it_lacked():
    snap = snapshot(
        worker("w1", [gpu(0), gpu(1)]),
        worker("w2", [gpu(0), gpu(1, used=20)]),  # gpu1 lacks the 90% headroom
        worker("w3", [gpu(0, total=48, product="L40S")]),  # another GPU group, offering less
    )
    model = ModelSpec(name="m", distributed_inference_across_workers=True)
    verdict = place(snap, model, NOW, request=request(300, u=0.9))
    assert isinstance(verdict, Unschedulable)
    assert (
        "closest multi-worker combination: w1 + w2 (2 × 2 H100-SXM-80GB) offers 216.00 of 300.00 GiB VRAM; "
        "lacks: 84.00 GiB VRAM short; w2/gpu1 lacks the 90% headroom"
    ) in verdict.message
    multi = next(r for r in verdict.reasons if r.plugin == "multi_worker")
    assert "closest multi-worker combination: w1 + w2" in multi.message


def test_multi_worker_explanation_names_a_missing_worker_for_the_world_size():
    snap = snapshot(worker("w1", [gpu(0), gpu(1)]), worker("w2", [gpu(0), gpu(1)], ram=8))
    model = ModelSpec(name="m", distributed_inference_across_workers=True)
    verdict = place(snap, model, NOW, request=request(200, u=0.9, count=6, ram=16))
    assert isinstance(verdict, Unschedulable)
    assert "closest multi-worker combination: w1 + w2 (2 × 2 H100-SXM-80GB)" in verdict.message
    assert "only 2 worker(s) with 2 H100-SXM-80GB GPUs each" in verdict.message


def test_no_multi_worker_note_when_the_model_is_not_distributed():
    snap = snapshot(worker("w1", [gpu(0), gpu(1)]), worker("w2", [gpu(0), gpu(1)]))
    verdict = place(snap, ModelSpec(name="m"), NOW, request=request(300, u=0.9))
    assert isinstance(verdict, Unschedulable) and "multi-worker" not in verdict.message
