"""Trace loaders: the shipped Azure and Mooncake files, time scaling, and bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.traces import TraceError, load_trace, loaders


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


def _rec(ts: str, ids: str = "[1]") -> str:
    return f'{{"timestamp": {ts}, "input_length": 10, "output_length": 5, "hash_ids": {ids}}}\n'


AZURE_HEAD = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


@pytest.mark.parametrize(
    ("name", "body", "says"),
    [
        ("nan.jsonl", _rec("0") + _rec("NaN"), "nan.jsonl:2: timestamp must be a finite"),
        ("inf.jsonl", _rec("Infinity"), "timestamp must be a finite"),
        ("negative.jsonl", _rec("-1000"), "timestamp must be a finite"),
        ("overflow.jsonl", _rec("0", "[1e400]"), "overflow.jsonl:1: bad record"),
        ("binary.csv", AZURE_HEAD + "\xff\xfe,\x00\n", "binary.csv:2: not UTF-8 text"),
        ("field.csv", AZURE_HEAD + "2023-11-16 18:15:46,10," + "1" * 200_000 + "\n", "bad CSV"),
        ("line.jsonl", '{"x": "' + "a" * (2 << 20) + '"}\n', "line.jsonl:1: line longer than 1 MiB"),
        # fewer ids than the prompt's 512-token blocks: the replay named blocks past the list's end
        ("short.jsonl", '{"timestamp": 0, "input_length": 2000, "output_length": 10, "hash_ids": [1]}\n',
         "short.jsonl:1: 1 hash_ids name 512 tokens, input_length is 2000"),
        ("empty.jsonl", '{"timestamp": 0, "input_length": 20, "output_length": 10, "hash_ids": []}\n',
         "empty.jsonl:1: 0 hash_ids"),
        ("digits.jsonl", _rec("0", '"123"'), "digits.jsonl:1: bad record .hash_ids must be a list"),
    ],
)
def test_a_hostile_trace_file_is_refused_naming_file_and_line(tmp_path: Path, name: str, body: str, says: str) -> None:
    path = tmp_path / name
    path.write_bytes(body.encode("latin-1") if name.endswith(".csv") else body.encode())
    with pytest.raises(TraceError, match=says):
        load_trace(str(path))


def test_a_trace_past_the_size_limit_is_refused_before_it_is_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loaders, "MAX_TRACE_BYTES", 1000)
    path = tmp_path / "long.jsonl"
    path.write_text(_rec("0") * 100)
    with pytest.raises(TraceError, match="larger than the limit"):
        load_trace(str(path))
    assert len(load_trace(str(path), limit=3)) == 3  # --limit reads only the head


def test_an_azure_row_earlier_than_the_first_arrives_at_time_zero(tmp_path: Path) -> None:
    path = tmp_path / "back.csv"
    path.write_text(AZURE_HEAD + "2023-11-16 18:15:46.5,10,5\n2023-11-16 18:14:46.5,10,5\n")
    assert [r.arrival_s for r in load_trace(str(path))] == [0.0, 60.0]


@pytest.mark.parametrize(("time_scale", "limit"), [(float("nan"), None), (float("inf"), None), (1.0, 0), (1.0, -1)])
def test_a_non_finite_time_scale_or_a_limit_below_one_is_refused(time_scale: float, limit: int | None) -> None:
    with pytest.raises(TraceError):
        load_trace("mooncake", time_scale, limit)


def test_an_arrival_pushed_past_the_float_range_by_a_tiny_time_scale_is_refused_naming_the_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "far.jsonl"
    path.write_text(_rec("0") + _rec("1e300"))
    with pytest.raises(TraceError, match=r"far.jsonl:2: arrival time out of range"):
        load_trace(str(path), time_scale=1e-300)


def test_an_azure_error_names_the_files_line_even_after_a_field_spanning_lines(tmp_path: Path) -> None:
    path = tmp_path / "multi.csv"
    path.write_text(AZURE_HEAD + '2023-11-16 18:15:46.5,10,"5\n"\n2023-11-16 18:15:47.5,x,5\n')
    with pytest.raises(TraceError, match=r"multi.csv:4: bad row"):
        load_trace(str(path))
