"""The emulated server keeps the emulated clock: arrivals never precede their step, lag is measured and
warned about, streams are written directly (or through ASGI when no transport is offered)."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest

from ops.servers import free_port
from services.engine_server.api import ServerInfo, create_app
from services.engine_server.runner import MAX_LAG_S, CollectSink, EngineRunner
from services.engine_server.server import EmbeddedServer, ServerOptions
from services.engine_server.textgen import TextModel
from shared.core.engine import CalibratedStepTime, Engine, Request, SchedulerConfig

STEP_S = 0.02


def _runner(clock: ManualClock | None = None, speedup: float = 1.0) -> EngineRunner:
    eng = Engine(SchedulerConfig(num_gpu_blocks=100), CalibratedStepTime(base_s=STEP_S, per_token_s=0.0),
                 fast_forward=False)
    if clock is None:
        return EngineRunner(eng, speedup=speedup)
    return EngineRunner(eng, speedup=speedup, clock=clock)


class ManualClock:
    """Wall clock the test moves; each read may add a fixed jump (a CPU-starved process)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


async def test_a_request_arriving_mid_step_is_first_scheduled_after_it_arrived() -> None:
    runner = _runner(speedup=1.0)
    runner.start()
    first = CollectSink()
    runner.submit(Request("a", [1] * 20, max_tokens=4, ignore_eos=True), first)
    await asyncio.sleep(STEP_S / 2)  # a step is in flight now
    late = Request("b", [2] * 20, max_tokens=4, ignore_eos=True)
    runner.submit(late, CollectSink())
    await asyncio.wait_for(first.done, 5)
    while runner.engine.has_work():
        await asyncio.sleep(0.01)
    await runner.stop()
    assert late.first_scheduled_time >= late.arrival_time
    assert late.queue_time >= 0
    assert late.ttft >= STEP_S - 1e-9  # it waited for its own step, never rode the one in flight


async def test_a_late_loop_stamps_arrivals_at_the_end_of_the_step_in_flight() -> None:
    clock = ManualClock()
    runner = _runner(clock)
    runner.t0 = clock.t
    runner._in_flight_end = 0.5  # a step ending at model time 0.5 is in flight ...
    clock.t += 0.8  # ... and the wall clock is already past it
    req = Request("r", [1] * 20, max_tokens=2, ignore_eos=True)
    runner.submit(req, CollectSink())
    assert req.arrival_time == 0.5


async def test_a_starved_loop_resyncs_counts_it_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    runner = _runner(clock)
    runner.t0 = clock.t
    sink = CollectSink()
    runner.submit(Request("r", [1] * 20, max_tokens=3, ignore_eos=True), sink)
    clock.t += 10 * MAX_LAG_S  # the process was descheduled for a long while
    with caplog.at_level(logging.WARNING, logger="gantry.engine_server"):
        runner.start()
        for _ in range(200):
            if sink.done.done():
                break
            await asyncio.sleep(0.001)
        await runner.stop()
    assert sink.done.done()
    assert runner.lag.resyncs == 1
    assert runner.lag.max_s >= 9 * MAX_LAG_S
    assert any("cannot keep up" in r.getMessage() for r in caplog.records)


async def test_a_loop_that_keeps_up_reports_little_lag() -> None:
    runner = _runner(speedup=1.0)
    runner.start()
    sink = CollectSink()
    runner.submit(Request("r", [1] * 20, max_tokens=5, ignore_eos=True), sink)
    await asyncio.wait_for(sink.done, 5)
    await runner.stop()
    assert runner.lag.resyncs == 0 and runner.lag.steps == 5
    assert runner.lag.busy_s < 5 * STEP_S


async def _stream_lines(http: httpx.AsyncClient, body: dict[str, object]) -> list[str]:
    async with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        return [ln[6:] async for ln in r.aiter_lines() if ln.startswith("data: ")]


async def test_without_a_transport_the_stream_goes_through_asgi_send() -> None:
    runner = _runner(speedup=50.0)
    info = ServerInfo(served_model_name="m", model_path="/x", catalog_model="m", gpu="g", tp=1, speedup=50.0,
                      max_model_len=1000)
    app = create_app(runner, TextModel(), info)
    runner.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
            lines = await _stream_lines(http, {"prompt": [1, 2, 3], "max_tokens": 6, "ignore_eos": True,
                                               "stream": True})
    finally:
        await runner.stop()
        app.state.writer.close()
    assert lines[-1] == "[DONE]"
    texts = [json.loads(x)["choices"][0]["text"] for x in lines[:-1]]
    assert len("".join(texts).split()) == 6


async def test_many_direct_streams_each_get_every_token_in_order() -> None:
    srv = EmbeddedServer(ServerOptions(port=free_port(), num_gpu_blocks=400, speedup=100.0))
    await srv.start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
            body = {"max_tokens": 40, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            results = await asyncio.gather(*(_stream_lines(http, {**body, "prompt": [i + 1] * 16})
                                             for i in range(20)))
    finally:
        await srv.stop()
    for lines in results:
        chunks = [json.loads(x) for x in lines[:-1]]
        assert lines[-1] == "[DONE]"
        assert len({c["id"] for c in chunks}) == 1
        texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
        assert len("".join(texts).split()) == 40 == chunks[-1]["usage"]["completion_tokens"]


async def test_a_client_that_hangs_up_mid_stream_is_aborted_and_frees_its_blocks() -> None:
    srv = EmbeddedServer(ServerOptions(port=free_port(), num_gpu_blocks=400, speedup=5.0))
    await srv.start()
    try:
        host, port = srv.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        body = json.dumps({"prompt": [5] * 40, "max_tokens": 5000, "ignore_eos": True, "stream": True}).encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
        got = b""
        while got.count(b"data: ") < 3:
            got += await asyncio.wait_for(reader.read(4096), 10)
        writer.close()
        sched = srv.runner.engine.scheduler
        for _ in range(500):
            if not sched.has_work():
                break
            await asyncio.sleep(0.01)
        assert not sched.has_work()
        assert sched.counters.finished_by_reason.get("abort") == 1
        assert sched.kv.num_free == 399
    finally:
        await srv.stop()


async def test_a_sink_on_a_transport_writes_chunked_sse_frames_in_order() -> None:
    from services.engine_server.sse import SseSink

    tm = TextModel()
    got: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()
    server = await asyncio.start_server(lambda r, w: got.set_result(w), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, client = await asyncio.open_connection("127.0.0.1", port)
    srv_writer = await got
    try:
        sink = SseSink("cmpl-1", "m", 1, chat=False, include_usage=True, pieces=tm.json_piece, eos=tm.eos_token_id)
        words = tm.words[:3]
        assert sink.token(words[0])  # produced before the headers: kept, then written on attach
        sink.attach(srv_writer.transport)
        assert sink.token(words[1]) and sink.token(tm.eos_token_id) and sink.token(words[2])
        sink.finish(Request("r", [1, 2], max_tokens=4), "stop", None)
        assert sink.done.done()
        raw = b""
        while b"[DONE]" not in raw:
            raw += await asyncio.wait_for(reader.read(65536), 5)
    finally:
        client.close()
        srv_writer.close()
        server.close()
    body, rest = b"", raw
    while rest:  # undo HTTP/1.1 chunked framing
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        body, rest = body + rest[:n], rest[n + 2:]
    events = [json.loads(e[6:]) for e in body.split(b"\n\n") if e.startswith(b"data: {")]
    texts = [e["choices"][0]["text"] for e in events if e["choices"]]
    assert "".join(texts) == tm.detokenize(words)
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["usage"]["completion_tokens"] == 3
    assert body.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("protocol", ["httptools", "h11"])
async def test_streams_work_over_both_http_parsers(protocol: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.engine_server import server as server_mod

    if protocol == "h11":
        monkeypatch.setattr(server_mod, "_http_protocol", lambda: server_mod.NoDelayH11Protocol)
    srv = EmbeddedServer(ServerOptions(port=free_port(), num_gpu_blocks=200, speedup=100.0, access_log=False))
    await srv.start()
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
            body = {"max_tokens": 12, "ignore_eos": True, "stream": True}
            results = await asyncio.gather(*(_stream_lines(http, {**body, "prompt": [i + 1] * 16}) for i in range(4)))
            # the connection is reused after a stream: the server ended the chunked body properly
            again = await _stream_lines(http, {**body, "prompt": [9] * 16})
    finally:
        await srv.stop()
    for lines in [*results, again]:
        assert lines[-1] == "[DONE]"
        texts = [json.loads(x)["choices"][0]["text"] for x in lines[:-1]]
        assert len("".join(texts).split()) == 12


class _GoneAfterFirst(CollectSink):
    """A client that hangs up as its first token is written."""

    def token(self, token_id: int) -> bool:
        super().token(token_id)
        return False


async def test_a_client_gone_while_a_step_emits_does_not_start_a_second_step_chain() -> None:
    runner = _runner(speedup=1.0)
    runner.start()
    stays, leaves, late = CollectSink(), _GoneAfterFirst(), CollectSink()
    runner.submit(Request("a", [1] * 20, max_tokens=6, ignore_eos=True), stays)
    runner.submit(Request("b", [2] * 20, max_tokens=6, ignore_eos=True), leaves)
    assert (await asyncio.wait_for(leaves.done, 5))[0] == "abort"
    runner.submit(Request("c", [3] * 20, max_tokens=3, ignore_eos=True), late)  # a kick while a step is in flight
    await asyncio.wait_for(asyncio.gather(stays.done, late.done), 5)
    await runner.stop()
    assert len(leaves.token_ids) == 1 and len(stays.token_ids) == 6 and len(late.token_ids) == 3
    assert runner.lag.steps == 6  # c rode along a's steps; no step ran twice or in parallel


async def test_a_stopped_runner_runs_no_more_steps() -> None:
    runner = _runner(speedup=1.0)
    runner.start()
    sink = CollectSink()
    runner.submit(Request("a", [1] * 20, max_tokens=50, ignore_eos=True), sink)
    while not sink.token_ids:
        await asyncio.sleep(0.005)
    await runner.stop()
    steps = runner.lag.steps
    await asyncio.sleep(3 * STEP_S)
    assert runner.lag.steps == steps and not sink.done.done()


def test_the_benchmark_counts_server_cpu_finer_than_clock_ticks() -> None:
    import os
    import time

    import psutil  # type: ignore[import-untyped]

    from bench.engine_server import server_cpu_s

    proc = psutil.Process(os.getpid())
    a, k0 = server_cpu_s(proc), time.process_time()
    while time.process_time() - k0 < 0.05:
        pass
    spent, k = server_cpu_s(proc) - a, time.process_time() - k0
    assert 0.5 * k <= spent <= 2 * k + 0.02  # this process's own busy loop, seen through the same counter


def test_the_benchmark_counts_each_sleep_of_the_server_as_a_wake_up() -> None:
    import os
    import time

    import psutil

    from bench.engine_server import server_wakeups

    proc = psutil.Process(os.getpid())
    before = sum(server_wakeups(proc).values())
    for _ in range(5):
        time.sleep(0.002)  # each sleep gives the core up once and is woken once
    woken = sum(server_wakeups(proc).values()) - before
    assert 5 <= woken <= 50  # this thread's five, and whatever the test runner's threads did meanwhile
