"""The side-by-side bench's verdicts compare the exact medians: a loss smaller than the table's rounding is a loss;
the TTFT verdict reads the engines' request logs (exact), not the histogram's interpolation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench.gateway_vs_sglang import exact_quantile, log_marks, logged_ttfts, summarize


def _row(setup: str, p90_s: float, hit: float = 0.8437, exact_p90_s: float | None = None) -> dict[str, Any]:
    exact = {} if exact_p90_s is None else {"ttft_exact_p50_s": 0.009, "ttft_exact_p90_s": exact_p90_s}
    return {**exact, "groups": 32, "setup": setup, "hit_rate": hit, "ttft_p50_s": 0.0094, "ttft_p90_s": p90_s,
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


def test_the_exact_p90_decides_when_the_request_logs_have_it() -> None:
    rows = [_row("gantry", 0.0196, exact_p90_s=0.0141), _row("sglang-cache_aware", 0.0195, exact_p90_s=0.0143)]
    checks = summarize(rows, ["gantry", "sglang-cache_aware"], [32])["checks"]
    assert checks["32_ttft_p90_le_sglang"] is True
    assert checks["32_ttft_p90_hist_le_sglang"] is False


def test_an_exact_p90_above_sglangs_fails_even_when_the_interpolated_one_is_below() -> None:
    rows = [_row("gantry", 0.0194, exact_p90_s=0.01431), _row("sglang-cache_aware", 0.0195, exact_p90_s=0.0143)]
    checks = summarize(rows, ["gantry", "sglang-cache_aware"], [32])["checks"]
    assert checks["32_ttft_p90_le_sglang"] is False


def test_rows_without_request_logs_fall_back_to_the_histogram_and_say_so() -> None:
    summary = summarize([_row("gantry", 0.0196), _row("sglang-cache_aware", 0.0195)],
                        ["gantry", "sglang-cache_aware"], [32])
    assert summary["checks"]["32_ttft_p90_le_sglang"] is False
    assert summary["ttft_p90_checked_on"] == {"32": "histogram (interpolated)"}


def test_older_rows_mixed_with_newer_ones_take_the_median_of_those_with_exact_figures() -> None:
    rows = [_row("gantry", 0.0196), _row("gantry", 0.0196, exact_p90_s=0.0141),
            _row("gantry", 0.0196, exact_p90_s=0.0145), _row("sglang-cache_aware", 0.0195, exact_p90_s=0.0144)]
    summary = summarize(rows, ["gantry", "sglang-cache_aware"], [32])
    assert summary["table"]["32"]["gantry"]["ttft_exact_p90_s"] == 0.0143  # of 0.0141 and 0.0145, not of a nan
    assert summary["ttft_p90_checked_on"] == {"32": "exact (request logs)"}


@pytest.mark.parametrize(("q", "values", "expected"), [
    (0.9, [4.0, 1.0, 3.0, 2.0], 3.7),  # numpy.quantile's default (linear)
    (0.5, [5.0], 5.0),
    (0.9, [1.0, 1.0, 10.0], 8.2),
])
def test_exact_quantile_interpolates_between_order_statistics(q: float, values: list[float], expected: float) -> None:
    assert exact_quantile(q, values) == pytest.approx(expected)


def test_only_the_runs_own_log_lines_count_and_requests_without_a_first_token_are_skipped(tmp_path: Path) -> None:
    log = tmp_path / "engine-0.requests.jsonl"
    log.write_text(json.dumps({"id": "warm-up", "ttft_s": 0.5}) + "\n")
    marks = log_marks([log, tmp_path / "not-yet.jsonl"])
    with log.open("a") as fh:
        fh.write(json.dumps({"id": "a", "ttft_s": 0.012}) + "\n" + json.dumps({"id": "b", "ttft_s": None}) + "\n")
    (tmp_path / "not-yet.jsonl").write_text(json.dumps({"id": "c", "ttft_s": 0.02}) + "\n")
    assert logged_ttfts([log, tmp_path / "not-yet.jsonl"], marks) == [0.012, 0.02]
