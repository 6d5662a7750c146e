"""``--request-log``: one line per ended request with the exact timings the histograms only bucket, written once per
step; a bad path is refused at start in one line, a full disk or pipe turns the log off and never the server, a
FIFO's reader gets every line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from ops.servers import free_port
from services.engine_server.request_log import RequestLog
from services.engine_server.runner import CollectSink, EngineRunner
from services.engine_server.server import EmbeddedServer, ServerOptions, parse_args
from shared.core.engine import CalibratedStepTime, Engine, Request, SchedulerConfig

STEP_S = 0.005


def _runner() -> EngineRunner:
    eng = Engine(SchedulerConfig(num_gpu_blocks=100), CalibratedStepTime(base_s=STEP_S, per_token_s=0.0),
                 fast_forward=False)
    return EngineRunner(eng, speedup=1.0)


def _logged(runner: EngineRunner, path: Path) -> RequestLog:
    """A request log on ``path`` wired into ``runner`` as the server wires it."""
    log = RequestLog(str(path))
    log.open()
    runner.on_close = log.write
    runner.on_flush.append(log.flush)
    return log


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def _one_chat(srv: EmbeddedServer, max_tokens: int) -> dict[str, Any]:
    """Start ``srv``, serve one chat completion of ``max_tokens`` tokens, stop it; the response body."""
    await srv.start()
    try:
        async with httpx.AsyncClient(base_url=srv.url) as c:
            r = await c.post("/v1/chat/completions", json={
                "model": "m", "max_tokens": max_tokens, "ignore_eos": True,
                "messages": [{"role": "user", "content": "hi"}]})
    finally:
        await srv.stop()
    body: dict[str, Any] = r.json()
    return body


async def _drain(runner: EngineRunner) -> None:
    while runner.streams:
        await asyncio.sleep(STEP_S)


async def test_each_ended_request_is_one_line_with_its_exact_ttft(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    runner = _runner()
    log = _logged(runner, path)
    runner.start()
    reqs = [Request(f"r{i}", [i + 1] * 40, max_tokens=3, ignore_eos=True) for i in range(3)]
    for req in reqs:
        runner.submit(req, CollectSink())
    await _drain(runner)
    await runner.stop()
    log.close()
    by_id = {rec["id"]: rec for rec in _lines(path)}
    assert sorted(by_id) == ["r0", "r1", "r2"]
    for req in reqs:
        rec = by_id[req.req_id]
        assert rec["ttft_s"] == pytest.approx(req.ttft, abs=1e-6)
        assert rec["e2e_s"] == pytest.approx(req.e2e, abs=1e-6)
        assert rec["queue_s"] == pytest.approx(req.queue_time, abs=1e-6)
        assert (rec["prompt_tokens"], rec["output_tokens"], rec["finish"]) == (40, 3, "length")
    assert runner.hists.ttft.total == len(by_id)  # the same requests the histogram counted


async def test_a_request_aborted_before_its_first_token_is_logged_without_a_ttft(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    runner = _runner()
    log = _logged(runner, path)
    req = Request("gone", [1] * 40, max_tokens=3, ignore_eos=True)
    runner.submit(req, CollectSink())
    runner.abort(req)  # before any step ran
    runner.start()
    await _drain(runner)
    await runner.stop()
    log.close()
    (rec,) = _lines(path)
    assert (rec["id"], rec["finish"], rec["ttft_s"], rec["queue_s"]) == ("gone", "abort", None, None)


async def test_a_full_pipe_turns_the_log_off_once_and_requests_keep_completing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader that never reads: the pipe fills up
    try:
        runner = _runner()
        log = _logged(runner, fifo)
        runner.start()
        with caplog.at_level(logging.WARNING, logger="gantry.engine_server"):
            for batch in range(40):  # ~40 lines a batch, ~7 kB: the 64 kB pipe is full within a few batches
                sinks = [CollectSink() for _ in range(40)]
                for i, sink in enumerate(sinks):
                    runner.submit(Request(f"r{batch}-{i}", [i + 1] * 20, max_tokens=1, ignore_eos=True), sink)
                await asyncio.wait_for(asyncio.gather(*(s.done for s in sinks)), 10)
                if log.lost:
                    break
        last = [CollectSink() for _ in range(3)]  # the server goes on after the log is off
        for i, sink in enumerate(last):
            runner.submit(Request(f"after-{i}", [i + 1] * 20, max_tokens=2, ignore_eos=True), sink)
        await asyncio.wait_for(asyncio.gather(*(s.done for s in last)), 10)
        await runner.stop()
    finally:
        os.close(reader)
    assert all(len(s.token_ids) == 2 for s in last)
    assert log.lost > 0 and log.written > 0
    warnings = [r.message for r in caplog.records if "request log" in r.message]
    assert len(warnings) == 1 and "the request log is off from now on" in warnings[0]


async def test_a_reader_a_little_behind_gets_every_line_whole(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    got = bytearray()
    try:
        runner = _runner()
        log = _logged(runner, fifo)
        runner.start()
        for batch in range(12):  # ~7 kB a batch: the 64 kB pipe is full by the 10th; the reader catches up after it
            sinks = [CollectSink() for _ in range(40)]
            for i, sink in enumerate(sinks):
                runner.submit(Request(f"r{batch}-{i}", [i + 1] * 20, max_tokens=1, ignore_eos=True), sink)
            await asyncio.wait_for(asyncio.gather(*(s.done for s in sinks)), 10)
            if batch == 10:
                with contextlib.suppress(BlockingIOError):
                    while chunk := os.read(reader, 1 << 16):
                        got += chunk
        await runner.stop()
        log.flush()  # what was still waiting
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(reader, 1 << 16):
                got += chunk
    finally:
        os.close(reader)
    lines = got.decode().splitlines()
    assert log.lost == 0 and len(lines) == log.written == 480  # a short write was finished by the next, none lost
    assert [json.loads(line)["id"] for line in lines] == [f"r{b}-{i}" for b in range(12) for i in range(40)]


async def test_a_fifo_with_a_reader_gets_every_line_from_a_served_request(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the reader is there before the server starts
    opts = parse_args(["--request-log", str(fifo), "--port", str(free_port()), "--num-gpu-blocks", "200",
                       "--speedup", "20", "--served-model-name", "m"])  # the check must not end the reader's file
    os.set_blocking(reader, True)
    got: list[bytes] = []

    def read_to_the_end() -> None:  # a reader such as `cat`: it stops at the first end of file
        while chunk := os.read(reader, 65536):
            got.append(chunk)

    reading = threading.Thread(target=read_to_the_end, daemon=True)
    reading.start()
    body = await _one_chat(EmbeddedServer(opts), max_tokens=2)
    assert opts.request_log_fd is not None  # the command line's own descriptor, which its process holds to its exit:
    os.close(opts.request_log_fd)  # closed as that exit would, so the reader's file ends (not a 10 s join timeout)
    await asyncio.to_thread(reading.join, 10)
    assert not reading.is_alive()  # the reader saw its file end: the stopped server holds no descriptor of it
    os.close(reader)
    (line,) = b"".join(got).splitlines()
    assert json.loads(line)["id"] == body["id"]


def test_the_log_appends_to_what_an_earlier_server_wrote(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b'{"id":"earlier"}\n')
    log = RequestLog(str(path))
    log.open()
    log.write(Request("later", [1] * 4, max_tokens=1), "abort", 0.5)
    log.close()  # what is pending is written on close
    assert [rec["id"] for rec in _lines(path)] == ["earlier", "later"]


@pytest.mark.parametrize("where", ["missing-dir/requests.jsonl", ".", "fifo", "x" * 5000, ""])
def test_a_request_log_that_cannot_be_opened_is_refused_in_one_line(
        where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os.mkfifo(tmp_path / "fifo")  # nobody reads it: opening must fail at once, not hang the start
    with pytest.raises(SystemExit) as exc:
        parse_args(["--request-log", str(tmp_path / where) if where else ""])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m services.engine_server: error: --request-log ")


async def test_a_served_chat_completion_is_logged_under_its_response_id(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    body = await _one_chat(EmbeddedServer(ServerOptions(port=free_port(), num_gpu_blocks=200, speedup=20.0,
                                                        served_model_name="m", request_log=str(path))), max_tokens=4)
    (rec,) = _lines(path)
    assert rec["id"] == body["id"]
    assert rec["output_tokens"] == body["usage"]["completion_tokens"] == 4
    assert rec["prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert rec["finish"] == "length" and isinstance(rec["ttft_s"], float) and rec["ttft_s"] > 0


async def test_the_request_logs_lines_written_and_lost_are_on_metrics(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    srv = EmbeddedServer(ServerOptions(port=free_port(), num_gpu_blocks=200, speedup=20.0, served_model_name="m",
                                       request_log=str(path)))
    await srv.start()
    try:
        async with httpx.AsyncClient(base_url=srv.url) as c:
            for _ in range(2):
                r = await c.post("/v1/chat/completions", json={
                    "model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 200
            log = srv.app.state.request_log
            assert isinstance(log, RequestLog)
            log.lost += 3  # as a full disk would have dropped three lines
            metrics = (await c.get("/metrics")).text
    finally:
        await srv.stop()
    samples = {ln.split("{")[0]: float(ln.rsplit(" ", 1)[1]) for ln in metrics.splitlines()
               if ln.startswith("gantry:engine_request_log_lines_")}
    assert samples == {"gantry:engine_request_log_lines_written_total": 2.0,
                       "gantry:engine_request_log_lines_lost_total": 3.0}
