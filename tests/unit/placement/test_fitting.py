"""Fit strategies (spec §5): each yields candidates or explains; the first that yields wins."""

from __future__ import annotations

import pytest

from shared.core.placement.domain import GIB, Backend, GgufSpec, GpuSelector, ModelSpec
from shared.core.placement.fitting import FIT_STRATEGIES
from shared.core.placement.pipeline import run_fitting
from shared.core.placement.profile import Profile
from tests.unit.placement.helpers import ctx, gpu, instance, request, snapshot, worker


def fit(strategy, snap, req, model=None, profile=None):
    c = ctx(snap, model, req, profile=profile or Profile())
    return FIT_STRATEGIES[strategy]().fit(c, [c.view(n) for n in snap.worker_names()])


def placements(outcome):
    return sorted((c.worker, c.gpu_indexes) for c in outcome.candidates)


# ------------------------------------------------------------------ single GPU

@pytest.mark.parametrize(
    ("gpus", "req", "expected"),
    [
        # utilisation backends need u × total allocatable and u × total ≥ V
        ([gpu(0), gpu(1, used=9)], request(20, u=0.9), [("w", (0,))]),  # 71 GiB < 72 GiB headroom
        ([gpu(0), gpu(1, used=8)], request(20, u=0.9), [("w", (0,)), ("w", (1,))]),  # exactly 72: ≥ is consistent
        ([gpu(0, total=24)], request(22, u=0.9), []),  # 21.6 GiB claim < V
        # others claim V and need V allocatable
        ([gpu(0, used=70), gpu(1, used=60)], request(12), [("w", (1,))]),
        ([gpu(0, used=68)], request(12), [("w", (0,))]),
        ([gpu(0, schedulable=False), gpu(1)], request(12), [("w", (1,))]),  # cordoned GPU skipped
    ],
)
def test_single_gpu_candidates(gpus, req, expected):
    assert placements(fit("single_gpu", snapshot(worker("w", gpus)), req)) == expected


def test_single_gpu_claims_the_utilization_fraction_of_the_gpu():
    out = fit("single_gpu", snapshot(worker("w", [gpu(0, total=48)])), request(20, u=0.9))
    assert out.candidates[0].vram_claims == (int(48 * GIB * 0.9),)


def test_single_gpu_skips_a_worker_short_of_ram_but_keeps_walking():
    snap = snapshot(worker("a", 1, ram=8), worker("b", 1, ram=64))
    assert placements(fit("single_gpu", snap, request(10, ram=16))) == [("b", (0,))]


def test_single_gpu_is_skipped_when_parallel_sizes_ask_for_more():
    c = ctx(snapshot(worker("w")), req=request(10, count=2))
    assert "2 GPUs" in FIT_STRATEGIES["single_gpu"]().skip(c)


def test_gpu_type_and_labels_restrict_the_gpus():
    snap = snapshot(worker("w", [gpu(0, product="A100-SXM-80GB"), gpu(1), gpu(2, labels={"nvlink": "yes"})]))
    model = ModelSpec(name="m", gpu_selector=GpuSelector(gpu_type="H100"))
    assert placements(fit("single_gpu", snap, request(10), model)) == [("w", (1,)), ("w", (2,))]
    model = ModelSpec(name="m", gpu_selector=GpuSelector(labels={"nvlink": "yes"}))
    assert placements(fit("single_gpu", snap, request(10), model)) == [("w", (2,))]


# ------------------------------------------------------------------ single worker, multiple GPUs

def test_multi_gpu_takes_gpus_by_allocatable_descending_and_keeps_the_fewest():
    w1 = worker("w1", [gpu(0, used=40), gpu(1, used=10), gpu(2), gpu(3, used=30)])
    w2 = worker("w2", [gpu(0, used=30), gpu(1, used=30), gpu(2, used=30), gpu(3, used=30)])
    out = fit("multi_gpu", snapshot(w1, w2), request(120))
    # w1: 80 + 70 = 150 ≥ 120 with 2 GPUs; w2 needs 3 (50 each) → only w1 kept (fewest GPUs)
    assert placements(out) == [("w1", (1, 2))]
    assert out.candidates[0].vram_claims == (60 * GIB, 60 * GIB)  # V split evenly


def test_multi_gpu_with_utilization_needs_headroom_on_every_gpu():
    w = worker("w", [gpu(0), gpu(1, used=20), gpu(2), gpu(3)])
    out = fit("multi_gpu", snapshot(w), request(140, u=0.9))
    assert placements(out) == [("w", (0, 2))]  # gpu 1 lacks the 90 % headroom


def test_multi_gpu_respects_tensor_parallel_divisibility():
    w = worker("w", [gpu(i, total=48) for i in range(4)])
    req = request(110, u=0.9, attention_heads=64, vocab_size=128256)  # 3 × 43.2 would do, but 3 ∤ 64
    assert placements(fit("multi_gpu", snapshot(w), req)) == [("w", (0, 1, 2, 3))]


def test_multi_gpu_uses_exactly_the_requested_world_size():
    w = worker("w", 8)
    assert placements(fit("multi_gpu", snapshot(w), request(100, u=0.9, count=4))) == [("w", (0, 1, 2, 3))]


def test_multi_gpu_never_mixes_gpu_types():
    w = worker("w", [gpu(0, total=48, product="L40S"), gpu(1), gpu(2, total=48, product="L40S")])
    assert placements(fit("multi_gpu", snapshot(w), request(85, u=0.9))) == [("w", (0, 2))]


# ------------------------------------------------------------------ multiple workers

def test_multi_worker_combines_workers_with_the_same_gpu_count():
    snap = snapshot(*(worker(f"w{i}", [gpu(0, total=48, product="L40S"), gpu(1, total=48, product="L40S")])
                      for i in range(3)), worker("odd", 1))
    model = ModelSpec(name="m", distributed_inference_across_workers=True)
    out = fit("multi_worker", snap, request(150, u=0.9), model)
    # 2 workers × 2 × 43.2 = 172.8 ≥ 150; every pair is a feasible combination
    assert [(c.worker, tuple(s.worker for s in c.subordinates)) for c in out.candidates] == [
        ("w0", ("w1",)), ("w0", ("w2",)), ("w1", ("w2",))]


def test_multi_worker_skips_workers_with_a_gpu_lacking_headroom():
    snap = snapshot(worker("w0", 2), worker("w1", [gpu(0), gpu(1, used=20)]), worker("w2", 2))
    model = ModelSpec(name="m", distributed_inference_across_workers=True)
    out = fit("multi_worker", snap, request(200, u=0.9), model)
    assert [(c.worker, c.subordinates[0].worker) for c in out.candidates] == [("w0", "w2")]


def test_multi_worker_is_off_unless_distributed_inference_is_enabled():
    c = ctx(snapshot(worker("w")), req=request(10))
    assert "not enabled" in FIT_STRATEGIES["multi_worker"]().skip(c)


def test_multi_worker_combinations_are_capped_by_the_profile():
    snap = snapshot(*(worker(f"w{i}", 1) for i in range(6)))
    model = ModelSpec(name="m", distributed_inference_across_workers=True)
    out = fit("multi_worker", snap, request(100, u=0.9), model, Profile(max_worker_combinations=4))
    assert len(out.candidates) == 4


# ------------------------------------------------------------------ partial offload and CPU

GGUF = GgufSpec(total_layers=40, layer_bytes=GIB // 2, non_layer_bytes=GIB, kv_bytes_per_token_per_layer=0)
GGUF_MODEL = ModelSpec(name="g", backend=Backend.LLAMA_CPP, cpu_offloading=True, gguf=GGUF)


def gguf_request():
    return request(21, gguf=GGUF)


def test_partial_offload_keeps_the_candidates_with_the_most_layers():
    snap = snapshot(worker("small", [gpu(0, total=8)]), worker("big", [gpu(0, total=12)]),
                    worker("tied", [gpu(0, total=12, product="L4")]))
    out = fit("partial_offload", snap, gguf_request(), GGUF_MODEL)
    assert placements(out) == [("big", (0,)), ("tied", (0,))]
    cand = out.candidates[0]
    assert (cand.offload_layers, cand.total_layers) == (24, 40)
    assert cand.vram_claims == (12 * GIB,)
    assert cand.ram_claim == GIB + 16 * (GIB // 2)


def test_partial_offload_splits_layers_over_a_workers_gpus_biggest_first():
    snap = snapshot(worker("w", [gpu(0, total=4), gpu(1, total=6)]))
    cand = fit("partial_offload", snap, gguf_request(), GGUF_MODEL).candidates[0]
    assert cand.gpu_indexes == (0, 1) and cand.vram_claims == (4 * GIB, 6 * GIB)
    assert cand.offload_layers == 20


def test_partial_offload_skips_workers_without_the_ram_for_the_rest():
    snap = snapshot(worker("w", [gpu(0, total=4)], ram=10))
    assert fit("partial_offload", snap, gguf_request(), GGUF_MODEL).candidates == []


def test_cpu_only_needs_the_whole_model_in_ram():
    snap = snapshot(worker("tiny", 0, ram=16), worker("large", 0, ram=64))
    out = fit("cpu_only", snap, gguf_request(), GGUF_MODEL)
    assert placements(out) == [("large", ())]
    assert out.candidates[0].ram_claim == GIB + 40 * (GIB // 2)


def test_partial_offload_and_cpu_need_cpu_offloading():
    c = ctx(snapshot(worker("w")), GGUF_MODEL.__class__(name="g", backend=Backend.LLAMA_CPP, gguf=GGUF),
            gguf_request())
    assert FIT_STRATEGIES["partial_offload"]().skip(c)
    assert FIT_STRATEGIES["cpu_only"]().skip(c)


# ------------------------------------------------------------------ manual selection

def manual_model(ids, replicas=1, per_replica=None):
    return ModelSpec(name="m", replicas=replicas,
                     gpu_selector=GpuSelector(gpu_ids=tuple(ids), gpus_per_replica=per_replica))


def test_manual_single_gpu_candidates_are_the_selected_gpus_that_fit():
    snap = snapshot(worker("a", [gpu(0), gpu(1, used=60)]), worker("b", 2))
    out = fit("manual", snap, request(20, u=0.9), manual_model(["a:0", "a:1", "b:1"], replicas=2))
    assert placements(out) == [("a", (0,)), ("b", (1,))]


def test_manual_excludes_gpus_already_holding_a_replica_of_the_model():
    snap = snapshot(worker("a", 2), instances=(instance("r0", "m", "a", (0,)),))
    out = fit("manual", snap, request(20, u=0.9), manual_model(["a:0", "a:1"], replicas=2))
    assert placements(out) == [("a", (1,))]
    assert any("already holds" in n for n in out.notes)


def test_manual_single_replica_overcommits_the_best_option_with_a_reason():
    snap = snapshot(worker("a", [gpu(0, used=50), gpu(1, used=40)]))
    out = fit("manual", snap, request(20, u=0.9), manual_model(["a:0", "a:1"]))
    assert placements(out) == [("a", (1,))]
    assert "overcommits" in out.candidates[0].overcommit


def test_manual_multi_replica_never_overcommits():
    snap = snapshot(worker("a", [gpu(0, used=50)]))
    out = fit("manual", snap, request(20, u=0.9), manual_model(["a:0"], replicas=2))
    assert out.candidates == []


def test_manual_multi_gpu_prefers_one_worker_else_spans_workers():
    snap = snapshot(worker("a", 2), worker("b", 2))
    out = fit("manual", snap, request(100, u=0.9, count=2), manual_model(["a:0", "a:1", "b:0"], per_replica=2))
    assert placements(out) == [("a", (0, 1))] and not out.candidates[0].subordinates
    out = fit("manual", snap, request(100, u=0.9, count=2), manual_model(["a:0", "b:0"], per_replica=2))
    cand = out.candidates[0]
    assert (cand.worker, cand.gpu_indexes, cand.subordinates[0].worker) == ("a", (0,), "b")


# ------------------------------------------------------------------ the chain

def test_first_strategy_with_candidates_wins_and_earlier_ones_explain():
    snap = snapshot(worker("w", 4))
    result = run_fitting(snap, ModelSpec(name="m"), request(100, u=0.9), ["w"])
    assert result.strategy == "multi_gpu"
    assert [r.plugin for r in result.reasons] == ["manual", "single_gpu"]


def test_with_selected_gpus_manual_is_the_only_strategy():
    snap = snapshot(worker("w", [gpu(0, used=79)]))
    model = manual_model(["w:0"], replicas=2)
    result = run_fitting(snap, model, request(20, u=0.9), ["w"])
    assert result.candidates == ()
    assert all("selected explicitly" in r.message for r in result.reasons if r.plugin != "manual")


def test_nothing_fits_gives_the_best_effort_message():
    snap = snapshot(worker("w", [gpu(0, total=24, used=4), gpu(1, total=24, used=10)]))
    result = run_fitting(snap, ModelSpec(name="m"), request(19, u=0.9), ["w"])
    assert result.candidates == ()
    assert result.message.startswith(
        "needs ≈19.00 GiB VRAM per replica; largest allocatable GPU: 20.00 GiB (w/gpu0, 83%)"
    )
    assert "0 of 2 GPUs have the 90% utilization headroom" in result.message


def test_gguf_full_offload_splits_in_proportion_to_allocatable_vram():
    w = worker("w", [gpu(0, total=24, used=12, product="L4"), gpu(1, total=24, product="L4")])
    spec = GgufSpec(total_layers=30, layer_bytes=GIB, non_layer_bytes=0, kv_bytes_per_token_per_layer=0)
    model = ModelSpec(name="g", backend=Backend.LLAMA_CPP, gguf=spec)
    out = fit("multi_gpu", snapshot(w), request(30, gguf=spec), model)
    # 12 + 24 GiB free: 30 GiB split 1 : 2
    assert placements(out) == [("w", (0, 1))]
    assert out.candidates[0].vram_claims == (10 * GIB, 20 * GIB)
