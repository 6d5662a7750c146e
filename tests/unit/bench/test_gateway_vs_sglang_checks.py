"""The side-by-side bench's verdicts compare the exact medians: a loss smaller than the table's rounding is a loss."""

from __future__ import annotations

from typing import Any

from bench.gateway_vs_sglang import summarize


def _row(setup: str, p90_s: float, hit: float = 0.8437) -> dict[str, Any]:
    return {"groups": 32, "setup": setup, "hit_rate": hit, "ttft_p50_s": 0.0094, "ttft_p90_s": p90_s,
            "ttft_mean_s": 0.011, "client_ttft_p50_s": 0.22, "client_ttft_p90_s": 0.23, "throughput_req_s": 10.0,
            "output_tok_s": 320.0, "router_cpu_s": 2.0, "errors": 0, "requests": 400}


def test_a_p90_four_microseconds_above_sglangs_fails_the_check() -> None:
    checks = summarize([_row("gantry", 0.019504), _row("sglang-cache_aware", 0.0195)],
                       ["gantry", "sglang-cache_aware"], [32])["checks"]
    assert checks["32_ttft_p90_le_sglang"] is False


def test_a_hit_rate_a_millionth_below_sglangs_fails_the_check() -> None:
    checks = summarize([_row("gantry", 0.0195, hit=0.843705), _row("sglang-cache_aware", 0.0195, hit=0.843706)],
                       ["gantry", "sglang-cache_aware"], [32])["checks"]
    assert checks["32_hit_rate_ge_sglang"] is False


def test_equal_medians_pass_both_checks() -> None:
    checks = summarize([_row("gantry", 0.0195), _row("sglang-cache_aware", 0.0195)],
                       ["gantry", "sglang-cache_aware"], [32])["checks"]
    assert checks["32_ttft_p90_le_sglang"] and checks["32_hit_rate_ge_sglang"]
