"""Resource requirements (spec §3): explicit claims, V = W × 1.2 + overhead, utilisation, GGUF layers."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.catalog import load_model_arch
from shared.core.placement.domain import GIB, Backend, Category, GgufSpec, GpuSelector, ModelSpec, Reason
from shared.core.placement.gguf_header import gguf_spec_from_reader
from shared.core.placement.parameters import find_parameter, world_size
from shared.core.placement.requirements import (
    estimate,
    gguf_cpu_ram,
    gguf_full_vram,
    gguf_partial,
    tp_divisible,
    utilization,
)
from tests.unit.placement.helpers import write_gguf

LLAMA8 = load_model_arch("llama-3.1-8b")
LLAMA70 = load_model_arch("llama-3.1-70b")


def test_safetensors_estimate_is_weights_times_1_2_plus_2_gib_for_llms():
    req = estimate(ModelSpec(name="llama-3.1-8b"), LLAMA8)
    assert not isinstance(req, Reason)
    weights = LLAMA8.params_total * 2  # bf16
    assert req.vram == int(weights * 1.2) + 2 * GIB
    assert req.attention_heads == 32 and req.vocab_size == 128256


def test_non_llm_overhead_is_half_a_gib_and_claims_no_utilization():
    req = estimate(ModelSpec(name="e", categories=(Category.EMBEDDING,), weight_bytes=10 * GIB))
    assert not isinstance(req, Reason)
    assert req.vram == 12 * GIB + GIB // 2
    assert req.gpu_memory_utilization == 0.0


def test_explicit_vram_claim_wins_over_the_catalogue():
    req = estimate(ModelSpec(name="llama-3.1-8b", vram_claim=5 * GIB, ram_claim=GIB), LLAMA8)
    assert not isinstance(req, Reason)
    assert (req.vram, req.ram) == (5 * GIB, GIB)


def test_unknown_weights_are_rejected_with_a_reason_never_zero():
    req = estimate(ModelSpec(name="mystery"))
    assert isinstance(req, Reason)
    assert "size unknown" in req.message


def test_gguf_without_layer_sizes_is_rejected():
    req = estimate(ModelSpec(name="g", backend=Backend.LLAMA_CPP, source="x.gguf"))
    assert isinstance(req, Reason)


@pytest.mark.parametrize(
    ("backend", "params", "categories", "expected"),
    [
        (Backend.VLLM, (), (Category.LLM,), 0.9),
        (Backend.VLLM, ("--gpu-memory-utilization=0.8",), (Category.LLM,), 0.8),
        (Backend.VLLM, ("--gpu-memory-utilization", "0.5"), (Category.SPEECH_TO_TEXT,), 0.5),
        (Backend.VLLM, (), (Category.EMBEDDING,), 0.0),
        (Backend.VLLM, (), (Category.RERANKER,), 0.0),
        (Backend.SGLANG, (), (Category.LLM,), 0.85),
        (Backend.SGLANG, ("--mem-fraction-static=0.7",), (Category.LLM,), 0.7),
        (Backend.LLAMA_CPP, (), (Category.LLM,), 0.0),
        (Backend.CUSTOM, (), (Category.LLM,), 0.0),
    ],
)
def test_utilization_claims_by_backend_and_category(backend, params, categories, expected):
    model = ModelSpec(name="m", backend=backend, backend_parameters=params, categories=categories)
    assert utilization(model) == expected


@pytest.mark.parametrize(
    ("params", "expected"),
    [((), None), (("--tensor-parallel-size=4",), 4), (("--tp", "2", "--pp=2"), 4),
     (("--tensor-parallel-size=2", "--data-parallel-size=3"), 6)],
)
def test_world_size_multiplies_parallel_sizes(params, expected):
    assert world_size(params) == expected


def test_find_parameter_forms():
    assert find_parameter(["--a=1"], ["a"]) == "1"
    assert find_parameter(["--a", "2"], ["a"]) == "2"
    assert find_parameter(["--flag", "--b=1"], ["flag"]) == ""
    assert find_parameter(["--x=1"], ["a"]) is None


def test_gpu_count_comes_from_the_gpu_selector_when_no_parallel_size_is_given():
    req = estimate(ModelSpec(name="llama-3.1-8b", gpu_selector=GpuSelector(gpus_per_replica=2)), LLAMA8)
    assert not isinstance(req, Reason)
    assert req.gpu_count == 2


@pytest.mark.parametrize(("size", "ok"), [(1, True), (2, True), (4, True), (8, True), (3, False), (6, False)])
def test_tensor_parallel_size_must_divide_heads_and_vocabulary(size, ok):
    req = estimate(ModelSpec(name="llama-3.1-70b"), LLAMA70)
    assert not isinstance(req, Reason)
    assert tp_divisible(size, req) is ok


def test_invalid_tensor_parallel_parameter_is_rejected():
    req = estimate(ModelSpec(name="llama-3.1-70b", backend_parameters=("--tensor-parallel-size=3",)), LLAMA70)
    assert isinstance(req, Reason) and "does not divide" in req.message


def test_non_numeric_parameter_is_rejected():
    req = estimate(ModelSpec(name="m", weight_bytes=GIB, backend_parameters=("--tp=many",)))
    assert isinstance(req, Reason)


SPEC = GgufSpec(total_layers=10, layer_bytes=100, non_layer_bytes=50, kv_bytes_per_token_per_layer=2, context_size=10)


def test_gguf_formulas_full_partial_and_cpu():
    # per layer: 100 + 2 × 10 = 120 bytes
    assert gguf_full_vram(SPEC) == 50 + 10 * 120
    assert gguf_partial(SPEC, 4) == (4 * 120, 50 + 6 * 120)
    assert gguf_cpu_ram(SPEC) == 50 + 10 * 120


def test_gguf_context_size_parameter_overrides_the_spec():
    req = estimate(ModelSpec(name="g", backend=Backend.LLAMA_CPP, gguf=SPEC, backend_parameters=("--ctx-size=20",)))
    assert not isinstance(req, Reason)
    assert req.gguf is not None and req.gguf.context_size == 20
    assert req.vram == 50 + 10 * (100 + 2 * 20)


def test_gguf_header_of_a_real_file_gives_layer_sizes(tmp_path: Path):
    from gguf import GGUFReader

    path = write_gguf(tmp_path / "tiny.gguf", layers=2, layer_shape=(64, 64))
    spec = gguf_spec_from_reader(GGUFReader(path))
    assert spec.total_layers == 2
    assert spec.layer_bytes == 64 * 64 * 2
    assert spec.non_layer_bytes == 100 * 64 * 2
    assert spec.kv_bytes_per_token_per_layer == 2 * 2 * 16 * 2  # K+V × kv heads × head dim × f16
    assert spec.context_size == 4096


@pytest.mark.parametrize(
    ("ids", "replicas", "params", "per_replica", "expected"),
    [
        (("w:0", "w:1"), 1, (), None, 2),  # GPUStack: 2 selected GPUs, 1 replica → 2 GPUs
        (("w:0", "w:1", "w:2"), 1, (), None, 2),  # the largest power of two not above 3
        (("a:0", "a:1", "b:0", "b:1"), 2, (), None, 2),
        (tuple(f"w:{i}" for i in range(8)), 1, (), None, 8),
        (("w:0",), 1, (), None, 1),
        (("w:0", "w:1"), 4, (), None, 1),  # fewer GPUs than replicas: one each
        (("w:0", "w:0", "w:1"), 1, (), None, 2),  # a duplicate id counts once
        (("w:0", "w:1"), 1, (), 1, 1),  # an explicit count wins
        (("w:0", "w:1", "w:2", "w:3"), 1, ("--tensor-parallel-size=2",), None, 2),  # parallel sizes win
    ],
)
def test_gpus_per_replica_derive_from_manual_selection_as_gpustack_does(ids, replicas, params, per_replica, expected):
    model = ModelSpec(name="m", weight_bytes=GIB, replicas=replicas, backend_parameters=params,
                      gpu_selector=GpuSelector(gpu_ids=ids, gpus_per_replica=per_replica))
    req = estimate(model)
    assert not isinstance(req, Reason)
    assert req.gpu_count == expected


def test_two_selected_gpus_and_one_replica_place_one_replica_on_both():
    from shared.core.placement.domain import Decision
    from shared.core.placement.pipeline import place
    from tests.unit.placement.helpers import NOW, snapshot, worker

    model = ModelSpec(name="m", weight_bytes=GIB, gpu_selector=GpuSelector(gpu_ids=("w1:0", "w1:1")))
    decision = place(snapshot(worker("w1", 4)), model, NOW)
    assert isinstance(decision, Decision) and decision.candidate.gpu_indexes == (0, 1)


_GGUF = GgufSpec(total_layers=40, layer_bytes=300 << 20, non_layer_bytes=700 << 20, kv_bytes_per_token_per_layer=4096)


@pytest.mark.parametrize(("spec", "why"), [
    (ModelSpec(name="a", source="x/a.gguf", backend=Backend.LLAMA_CPP, gguf=_GGUF,
               backend_parameters=("--ctx-size=-1000000000",)), "--ctx-size must be within 0..16777216"),
    (ModelSpec(name="b", source="x/b.gguf", backend=Backend.LLAMA_CPP, gguf=_GGUF,
               backend_parameters=("--ctx-size=100000000000000000000",)), "--ctx-size must be within"),
    (ModelSpec(name="c", source="x/c.gguf", backend=Backend.LLAMA_CPP,
               gguf=GgufSpec(total_layers=1, layer_bytes=1, non_layer_bytes=1, kv_bytes_per_token_per_layer=1 << 40,
                             context_size=1 << 24)), "outside 0.."),
])
def test_a_spec_whose_estimate_leaves_the_bounds_is_refused_with_a_reason(spec: ModelSpec, why: str) -> None:
    # before: a negative claim (-152,576 GiB) that fitting placed, or a claim past 2^63 that crashed fitting's
    # int64 columns and dead-lettered every model batched with it
    got = estimate(spec)
    assert isinstance(got, Reason) and why in got.message


def test_a_gguf_whose_layers_take_no_vram_is_not_offloaded_layer_by_layer() -> None:
    from shared.core.placement.pipeline import place
    from tests.unit.placement.helpers import NOW, gpu, snapshot, worker

    spec = ModelSpec(name="d", source="x/d.gguf", backend=Backend.LLAMA_CPP, cpu_offloading=True,
                     gguf=GgufSpec(total_layers=48, layer_bytes=0, non_layer_bytes=40 << 30,
                                   kv_bytes_per_token_per_layer=0))
    # the whole model does not fit the 16 GiB GPU: the fitters go on to partial offload, which divided by zero
    place(snapshot(worker("w", [gpu(0, total=16)], ram=64)), spec, NOW)
