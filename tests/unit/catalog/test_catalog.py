"""The built-in catalogue resolves friendly names and derives sizes that match published figures."""

from __future__ import annotations

import pytest

from shared.catalog import UnknownGpuError, UnknownModelError, load_gpu_spec, load_model_arch

GIB = 1 << 30


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("llama-3.1-8b", "llama-3.1-8b-instruct"),
        ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b-instruct"),
        ("Llama-3.1-70B-Instruct", "llama-3.1-70b-instruct"),
        ("qwen2.5-7b", "qwen2.5-7b-instruct"),
        ("mistral-7b", "mistral-7b-v0.1"),
        ("llama-3.1-405b", "meta-llama-3.1-405b"),
    ],
)
def test_model_names_resolve_to_catalogue_keys(name: str, key: str) -> None:
    assert load_model_arch(name).key == key


@pytest.mark.parametrize(
    ("name", "published_params_b", "kv_bytes_per_token"),
    [
        ("llama-3.1-8b", 8.03, 131072),
        ("llama-3.1-70b", 70.6, 327680),
        ("qwen2.5-7b", 7.6, 57344),
        ("mixtral-8x7b", 46.7, 131072),
        ("deepseek-v3", 671.0, 70272),
    ],
)
def test_parameter_counts_and_kv_bytes_match_published_figures(
    name: str, published_params_b: float, kv_bytes_per_token: int
) -> None:
    arch = load_model_arch(name)
    assert arch.params_total / 1e9 == pytest.approx(published_params_b, rel=0.01)
    assert arch.kv_bytes_per_token_bf16 == kv_bytes_per_token


def test_weight_bytes_scale_with_dtype() -> None:
    arch = load_model_arch("llama-3.1-8b")
    assert arch.weight_bytes("bfloat16") / GIB == pytest.approx(14.96, abs=0.01)
    assert arch.weight_bytes("fp8") * 2 == arch.weight_bytes("bf16")


def test_mixture_of_experts_has_fewer_active_than_total_parameters() -> None:
    arch = load_model_arch("mixtral-8x7b")
    assert arch.num_experts == 8
    assert arch.params_active < arch.params_total


def test_unknown_model_is_a_clear_error() -> None:
    with pytest.raises(UnknownModelError, match="unknown model 'no-such-model'"):
        load_model_arch("no-such-model")


@pytest.mark.parametrize(
    ("name", "key", "mem_gib"),
    [("H100-SXM-80GB", "h100_sxm", 80), ("h100_sxm", "h100_sxm", 80), ("A100-SXM-80GB", "a100_sxm", 80),
     ("H200", "h200_sxm", 141), ("L40S", "l40s", 45)],
)
def test_gpu_names_resolve_to_spec_rows(name: str, key: str, mem_gib: int) -> None:
    spec = load_gpu_spec(name)
    assert spec.key == key
    assert spec.mem_bytes / GIB == pytest.approx(mem_gib, abs=0.5)


def test_h100_sxm_datasheet_numbers_are_in_si_units() -> None:
    spec = load_gpu_spec("H100-SXM-80GB")
    assert spec.bf16_flops == pytest.approx(989e12)
    assert spec.mem_bw_bytes_s == pytest.approx(3350e9)


def test_unknown_gpu_is_a_clear_error() -> None:
    with pytest.raises(UnknownGpuError, match="unknown GPU 'TPU-v9'"):
        load_gpu_spec("TPU-v9")
