"""Trace loaders: the shipped Azure and Mooncake files, time scaling, and bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.traces import TraceError, load_trace


def test_azure_conversation_trace_spans_about_an_hour_from_zero() -> None:
    reqs = load_trace("azure-conv")
    assert len(reqs) == 19_366
    assert reqs[0].arrival_s == 0.0
    assert 3400 < reqs[-1].arrival_s < 3600
    assert (reqs[0].prompt_len, reqs[0].output_len) == (374, 44)


def test_time_scale_compresses_arrivals() -> None:
    assert load_trace("azure-code", time_scale=2.0, limit=50)[-1].arrival_s == pytest.approx(
        load_trace("azure-code", limit=50)[-1].arrival_s / 2
    )


def test_mooncake_records_keep_their_prefix_block_ids() -> None:
    reqs = load_trace("mooncake", limit=100)
    assert all(r.prefix_ids is not None and len(r.prefix_ids) == -(-r.prompt_len // 512) for r in reqs)
    assert reqs == sorted(reqs, key=lambda r: r.arrival_s)


def test_a_bad_row_is_reported_with_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "t.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,10,5\nnot a time,1,1\n")
    with pytest.raises(TraceError, match=r"t.csv:3"):
        load_trace(str(bad))


def test_an_unknown_trace_name_lists_the_known_ones() -> None:
    with pytest.raises(TraceError, match="azure-conv"):
        load_trace("nope")
