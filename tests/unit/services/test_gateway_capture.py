"""Capturing routed traffic as a replayable trace: prefix-block ids, output counting from body chunks, the
picker writing one line per finished request, and the trace read back by the loader `gantry simulate` uses."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from services.gateway.capture import BLOCK, OutputCounter, Pending, TraceWriter, block_ids, record_of
from services.gateway.epp import SERVED, Picker
from services.gateway.pool import PoolView, metrics_of
from shared.core.routing import Router, builtin_config
from shared.traces import load_trace
from tests.unit.services.test_gateway_picker import NOW, Exchange, body_msg, chat, headers_msg, report


# -- prefix-block ids ------------------------------------------------------------------------------------
def test_block_ids_cover_every_512_token_block_including_a_partial_last_one() -> None:
    assert len(block_ids(list(range(BLOCK)))) == 1
    assert len(block_ids(list(range(BLOCK + 1)))) == 2
    assert block_ids([]) == []


def test_equal_prefixes_share_ids_until_the_first_block_that_differs() -> None:
    a = block_ids([1] * BLOCK + [2] * BLOCK + [3])
    b = block_ids([1] * BLOCK + [2] * BLOCK + [4])
    c = block_ids([9] * BLOCK + [2] * BLOCK + [3])
    assert a[:2] == b[:2] and a[2] != b[2]
    assert c[1] != a[1]  # chained: the same block content after a different prefix is another id


def test_the_salt_changes_every_id_and_ids_are_non_negative_63_bit() -> None:
    toks = list(range(2 * BLOCK))
    plain, salted = block_ids(toks), block_ids(toks, b"secret")
    assert all(x != y for x, y in zip(plain, salted, strict=True))
    assert all(0 <= x < 1 << 63 for x in plain + salted)


def test_huge_token_ids_are_hashed_not_rejected() -> None:
    assert len(block_ids([2**40, -5, 7])) == 1


# -- output counting -------------------------------------------------------------------------------------
def test_usage_completion_tokens_wins_even_split_across_chunks() -> None:
    c = OutputCounter()
    for part in (b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n', b'data: {"usage":{"completion_tok',
                 b'ens": 1', b"7}}\n\ndata: [DONE]\n\n"):
        c.feed(part)
    assert c.usage == 17 and c.tokens == 17


def test_without_usage_streamed_text_chunks_are_counted_once_each() -> None:
    c = OutputCounter()
    stream = b"".join(b'data: {"choices":[{"delta":{"content":"t%d"}}]}\n\n' % i for i in range(9))
    stream = b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n' + stream + b"data: [DONE]\n\n"
    for i in range(0, len(stream), 7):  # chunk boundaries fall inside the patterns
        c.feed(stream[i:i + 7])
    assert c.usage is None and c.tokens == 9


def test_a_usage_count_too_long_to_be_real_is_ignored_not_raised() -> None:
    c = OutputCounter()
    c.feed(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n')
    c.feed(b'data: {"usage":{"completion_tokens":' + b"9" * 5000 + b"}}\n\n")
    assert c.usage is None and c.tokens == 1


def test_non_streamed_completion_counts_from_its_usage() -> None:
    c = OutputCounter()
    c.feed(b'{"choices":[{"text":"abc"}],"usage":{"prompt_tokens":5,"completion_tokens":3}}')
    assert c.tokens == 3


@pytest.mark.parametrize(("status", "inp", "out", "kept"), [
    (200, 10, 3, True), (500, 10, 3, False), (0, 10, 3, False), (200, 0, 3, False), (200, 10, 0, False)])
def test_only_successful_requests_that_generated_something_are_recorded(status: int, inp: int, out: int,
                                                                        kept: bool) -> None:
    p = Pending(arrival=12.5, model="m", input_length=inp, hash_ids=[1], status=status)
    p.output.usage = out
    rec = record_of(p, start=10.0)
    assert (rec is not None) is kept
    if rec is not None:
        assert rec.timestamp == 2500.0 and rec.output_length == out and rec.time == 12.5


# -- the picker writes the trace -------------------------------------------------------------------------
def _capturing_picker(path: Path) -> tuple[Picker, TraceWriter]:
    router = Router(builtin_config("default"))
    view = PoolView()
    r = report("a", 8001)
    view.observe(r, NOW)
    router.set_endpoints(list(view.endpoints.values()))
    router.update_metrics("a", metrics_of(r))
    writer = TraceWriter(path, start=NOW - 1.0)
    tokens = {"text": 0}

    def tokenize(text: str) -> list[int]:  # one token per character: lengths are easy to check
        tokens["text"] += 1
        return [ord(ch) for ch in text]

    addrs = {"a": "127.0.0.1:8001"}
    return Picker(router, lambda: addrs, clock=lambda: NOW, tokenize=tokenize, capture=writer), writer


def _resp_headers(status: str) -> pb.ProcessingRequest:
    hs = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in
          ((":status", status), (SERVED, "127.0.0.1:8001"))]
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=hs)))


async def _one(p: Picker, prompt: str, status: str, body: bytes) -> None:
    ex = Exchange(p)
    await ex.send(headers_msg())
    await ex.send(body_msg(chat(prompt)))
    await ex.send(_resp_headers(status))
    await ex.send(pb.ProcessingRequest(response_body=pb.HttpBody(body=body, end_of_stream=True)))
    with pytest.raises(StopAsyncIteration):
        await ex.gen.__anext__()


async def test_picker_writes_one_line_per_finished_request_and_the_loader_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    p, writer = _capturing_picker(path)
    await _one(p, "x" * 600, "200", b'{"usage":{"completion_tokens":4}}')
    await _one(p, "y" * 20, "200", b'{"usage":{"completion_tokens":9}}')
    await _one(p, "z", "503", b'{"error":{}}')  # the engine failed it: not replayable
    writer.close()
    assert (writer.written, writer.skipped) == (2, 1)
    lines = [msgspec.json.decode(line) for line in path.read_bytes().splitlines()]
    assert all("x" * 10 not in str(line) for line in lines)  # never the prompt text
    reqs = load_trace(str(path))
    assert [(r.output_len, r.arrival_s) for r in reqs] == [(4, 1.0), (9, 1.0)]
    assert reqs[0].prompt_len > 600 and len(reqs[0].prefix_ids or ()) == 2  # chat template + 600 chars
    assert p.capturing == {}  # nothing kept once the streams ended


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_write_error_loses_the_line_not_the_picker() -> None:
    w = TraceWriter(Path("/dev/full"), start=0.0)  # every flush fails: no space left on device
    p = w.begin(1.0, "m", [1, 2, 3])
    p.status = 200
    p.output.usage = 2
    w.finish(p)
    assert (w.written, w.failed) == (0, 1)
    w.close()


# -- a capture across restarts, kills and clock steps ----------------------------------------------------------------
def _pending(arrival: float, n: int = 600) -> Pending:
    p = Pending(arrival, "m", n, block_ids(list(range(n))), status=200)
    p.output.usage = 10  # the response said so
    return p


def test_a_restarted_picker_continues_the_files_timeline_and_the_replay_keeps_the_gap(tmp_path: Path) -> None:
    # each run counted from its own start: replayed, two runs 2.5 h apart were overlaid at time 0
    path = tmp_path / "trace.jsonl"
    first = TraceWriter(path, start=1_000.0)
    first.finish(_pending(1_060.0))
    first.close()
    second = TraceWriter(path, start=10_000.0)  # a later run appends
    second.finish(_pending(10_030.0))
    second.close()
    assert [round(r.arrival_s) for r in load_trace(str(path))] == [60, 9_030]  # one timeline, the gap kept


def test_a_line_a_killed_picker_left_unfinished_is_cut_off_when_the_capture_is_opened_again(tmp_path: Path) -> None:
    # it made the whole file unreadable, and the next run's first line was appended to it
    path = tmp_path / "trace.jsonl"
    w = TraceWriter(path, start=1_000.0)
    w.finish(_pending(1_001.0))
    w.close()
    with path.open("ab") as fh:
        fh.write(b'{"timestamp": 2000.0, "input_len')  # killed mid-write
    w = TraceWriter(path, start=2_000.0)
    w.finish(_pending(2_010.0))
    w.close()
    assert len(load_trace(str(path))) == 2


def test_a_wall_clock_stepped_back_never_writes_a_negative_timestamp(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    w = TraceWriter(path, start=1_000.0)
    w.finish(_pending(999.5))  # NTP stepped the clock back half a second
    w.close()
    assert [r.arrival_s for r in load_trace(str(path))] == [0.0]


def test_a_capture_stops_growing_at_what_a_replay_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.gateway import capture

    monkeypatch.setattr(capture, "MAX_CAPTURE_BYTES", 2_000)
    path = tmp_path / "trace.jsonl"
    w = TraceWriter(path, start=1_000.0)
    for i in range(100):
        w.finish(_pending(1_000.0 + i, n=20))
    w.close()
    assert path.stat().st_size <= 2_000 and w.dropped > 0 and w.written + w.dropped == 100
