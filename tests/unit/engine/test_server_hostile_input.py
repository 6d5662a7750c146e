"""What a stranger's request can do to the emulated model server: every malformed, out-of-range or oversized
input gets a clear OpenAI-shaped 4xx (as vLLM answers it), never a 500, a hung connection or unbounded memory,
and other clients are served meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import httpx
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from ops.servers import free_port
from services.engine_server import api
from services.engine_server.server import (
    MAX_HEAD_BYTES,
    EmbeddedServer,
    NoDelayH11Protocol,
    QuietServer,
    ServerOptions,
    _http_protocol,
    build,
    close_stalled,
)

CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]

# (case, path, body as JSON text, status, what the error message says)
_REFUSED: list[tuple[str, str, str, int, str]] = [
    ("nesting deeper than the JSON decoder goes", CMPL, '{"prompt": "hi", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
     400, "nested too deep"),
    ("a lone surrogate in a prompt", CMPL, '{"prompt": "a\\ud800b", "max_tokens": 2}', 400, "lone surrogate"),
    ("a lone surrogate in a chat message", CHAT, '{"messages": [{"role": "user", "content": "\\udfff"}]}', 400,
     "lone surrogate"),
    ("a negative token id", CMPL, '{"prompt": [5, -1], "max_tokens": 2}', 400, "Token id -1 is out of vocabulary"),
    ("a token id past the emulated model's vocabulary", CMPL, '{"prompt": [[5, 128256]], "max_tokens": 2}', 400,
     "Token id 128256 is out of vocabulary"),  # (llama-3.1-8b's)
    ("a token id past 64 bits", CMPL, '{"prompt": [1180591620717411303424]}', 400, "out of vocabulary"),
    ("logprobs 0 on completions", CMPL, '{"prompt": "hi", "logprobs": 0}', 400, "logprobs are not supported"),
    ("best_of 0", CMPL, '{"prompt": "hi", "best_of": 0}', 400, "best_of"),
    ("min_tokens above max_tokens", CMPL, '{"prompt": "hi", "max_tokens": 2, "min_tokens": 10}', 400,
     "min_tokens must be less than or equal to max_tokens=2"),
    # without max_tokens it was silently ignored: the completions default is 16 tokens, as vLLM's
    ("min_tokens above the default length", CMPL, '{"prompt": "hi", "min_tokens": 100000}', 400,
     "min_tokens must be less than or equal to max_tokens=16"),
    ("a NaN temperature", CMPL, '{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("an infinite temperature", CMPL, '{"prompt": "hi", "temperature": Infinity}', 400, "temperature"),
    ("a negative temperature", CMPL, '{"prompt": "hi", "temperature": -1}', 400, "temperature"),
    ("top_p above 1", CHAT, '{"messages": [{"role": "user", "content": "x"}], "top_p": 5}', 400, "top_p"),
    ("a content part whose text is not text", CHAT,
     '{"messages": [{"role": "user", "content": [{"type": "text", "text": ["a"]}]}]}', 400, "messages.0.content"),
    ("a priority past a float", CMPL, '{"prompt": "hi", "priority": 1e400}', 400, "priority"),
    ("max_tokens -1", CMPL, '{"prompt": "hi", "max_tokens": -1}', 400, "max_tokens"),
    ("n 1000000", CMPL, '{"prompt": "hi", "n": 1000000}', 400, "n > 1"),
    ("a prompt of 100000 token ids", CMPL, json.dumps({"prompt": [5] * 100_000}), 400, "maximum context"),
    ("a batch of 100000 prompts", CMPL, json.dumps({"prompt": ["a"] * 100_000}), 400, "one prompt per request"),
    ("a batch of one prompt of 100000 token ids", CMPL, json.dumps({"prompt": [[5] * 100_000]}), 400,
     "maximum context"),
    ("a model name with path characters", CMPL, '{"prompt": "hi", "model": "../../etc/passwd"}', 404,
     "The model `../../etc/passwd` does not exist"),
    ("not JSON", CMPL, '{"prompt": ', 400, "body is not valid JSON"),
]


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client of a running server app (its engine stepping, no sockets)."""
    app, runner = build(ServerOptions(num_gpu_blocks=2500, speedup=100.0, served_model_name="m", access_log=False))
    runner.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            yield client
    finally:
        await runner.stop()
        app.state.writer.close()


def _error_of(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == r.status_code  # the OpenAI error shape
    return dict(body["error"])


@pytest.mark.parametrize(("case", "path", "body", "status", "says"), _REFUSED, ids=[c[0] for c in _REFUSED])
async def test_a_hostile_body_gets_a_clear_openai_error_and_the_server_keeps_serving(
    http: httpx.AsyncClient, case: str, path: str, body: str, status: int, says: str
) -> None:
    r = await http.post(path, content=body.encode("utf-8", "surrogatepass"),
                        headers={"content-type": "application/json"})
    assert r.status_code == status, (case, r.text[:300])
    assert says in _error_of(r)["message"], case
    ok = await http.post(CMPL, json={"prompt": "hi", "max_tokens": 2, "ignore_eos": True})
    assert ok.status_code == 200


async def test_an_unknown_model_name_is_echoed_cut_short(http: httpx.AsyncClient) -> None:
    r = await http.post(CMPL, json={"prompt": "hi", "model": "m" * 1_000_000})
    assert r.status_code == 404 and len(_error_of(r)["message"]) < 2 * api.SHOWN_NAME_CHARS


async def test_frameworks_own_refusals_use_the_openai_error_shape(http: httpx.AsyncClient) -> None:
    assert "Not Found" in _error_of(await http.get("/v1/nothing-here"))["message"]
    assert _error_of(await http.get(CMPL))["type"] == "MethodNotAllowedError"


async def test_a_body_past_the_limit_is_a_413_that_closes_the_connection() -> None:
    app, runner = build(ServerOptions(num_gpu_blocks=100, access_log=False))
    assert isinstance(app, api.ServerApp)
    assert app.body_limit == 1 << 20  # (at least a MiB, 128 bytes a token of a longer context)
    app.body_limit = 1000

    async def pieces() -> AsyncIterator[bytes]:
        for _ in range(20):  # sent in pieces, as a large body arrives
            yield b" " * 100

    runner.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            r = await client.post(CMPL, content=pieces(), headers={"content-type": "application/json"})
    finally:
        await runner.stop()
        app.state.writer.close()
    assert r.status_code == 413 and r.headers["connection"] == "close"
    assert "larger than 1000 bytes" in _error_of(r)["message"]


@pytest.mark.parametrize(("body", "says"), [
    (json.dumps({"prompt": "hi", "max_tokens": 2, "pad": "x" * 300_000, "n": 2}), "n > 1"),
    (json.dumps({"prompt": "hi", "pad": "x" * 300_000, "max_tokens": 0}), "max_tokens: Input should be greater"),
    ('{"prompt": "hi", "pad": "' + "x" * 300_000, "body is not valid JSON"),
    ('{"prompt": "hi", "x": ' + "[" * 200_000 + "]" * 200_000 + "}", "nested too deep"),
], ids=["refused by the endpoint", "invalid", "not JSON", "nested too deep"])
async def test_a_large_body_judged_off_the_event_loop_gets_the_same_clear_400(
    http: httpx.AsyncClient, body: str, says: str
) -> None:
    assert len(body) > api.OFFLOOP_PARSE_BYTES
    r = await http.post(CMPL, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and says in _error_of(r)["message"]


async def test_a_body_in_many_pieces_under_the_limit_is_served(http: httpx.AsyncClient) -> None:
    text = json.dumps({"prompt": "hi", "max_tokens": 2, "ignore_eos": True}).encode()

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(len(text)):
            yield text[i : i + 1]

    r = await http.post(CMPL, content=pieces(), headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


# -- the connection: a server on a real socket ----------------------------------------------------------------
@pytest.fixture
async def server() -> AsyncIterator[EmbeddedServer]:
    srv = EmbeddedServer(ServerOptions(port=free_port(), num_gpu_blocks=200, speedup=100.0, access_log=False,
                                       request_read_timeout_s=0.5))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def _talk(srv: EmbeddedServer, data: bytes, wait_s: float = 5.0) -> tuple[bytes, bool]:
    """What the server writes back to ``data`` and whether it closed the connection within ``wait_s``."""
    host, port = srv.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    got = b""
    try:
        writer.write(data)
        while chunk := await asyncio.wait_for(reader.read(65536), wait_s):
            got += chunk
        return got, True
    except TimeoutError:
        return got, False
    except ConnectionResetError:  # closed with unread input: a reset
        return got, True
    finally:
        writer.close()


async def test_a_request_head_past_the_limit_is_a_431_and_the_connection_closes(server: EmbeddedServer) -> None:
    for head in (b"x-a: " + b"a" * MAX_HEAD_BYTES + b"\r\n",  # one endless header
                 b"x-a: b\r\n" * 100_000):  # or a great many
        got, closed = await _talk(server, b"GET /health HTTP/1.1\r\nhost: x\r\n" + head + b"\r\n")
        assert got.startswith(b"HTTP/1.1 431 ") and closed
        error = json.loads(got.partition(b"\r\n\r\n")[2])["error"]
        assert error["code"] == 431 and error["type"] == "RequestHeaderFieldsTooLargeError"


_FRAMING = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"


@pytest.mark.parametrize("sent", [
    _FRAMING + b"content-length: -1\r\n\r\n{}",
    _FRAMING + b"content-length: 2\r\ncontent-length: 5\r\n\r\n{}",
    _FRAMING + b"content-length: 2\r\ntransfer-encoding: chunked\r\n\r\n{}",
    _FRAMING + b"transfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    _FRAMING + b"transfer-encoding: chunked\r\n\r\nffffffffffffffffffff\r\n{}",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 50,
], ids=["negative length", "two lengths", "length and chunked", "bad chunk size", "huge chunk size", "TLS hello"])
async def test_a_request_that_cannot_be_framed_is_a_json_400_and_the_connection_closes(
    server: EmbeddedServer, sent: bytes
) -> None:
    got, closed = await _talk(server, sent)
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and closed
    assert json.loads(body)["error"]["code"] == 400


@pytest.fixture(params=["httptools", "h11"])
async def either_parser_server(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
                               ) -> AsyncIterator[EmbeddedServer]:
    """``server`` on each HTTP parser: h11 as the server falls back to it when httptools cannot be imported."""
    if request.param == "h11":
        monkeypatch.setitem(sys.modules, "uvicorn.protocols.http.httptools_impl", None)  # import raises
    srv = EmbeddedServer(ServerOptions(port=free_port(), num_gpu_blocks=200, speedup=100.0, access_log=False,
                                       request_read_timeout_s=0.5))
    assert srv._server.config.http is not NoDelayH11Protocol or request.param == "h11"
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.mark.parametrize("sent", [b"", b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n",
                                  b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                                  b"content-length: 100\r\n\r\n{\"prompt\": "],
                         ids=["nothing", "half a head", "a body shorter than its length"])
async def test_a_connection_that_does_not_deliver_a_whole_request_in_time_is_closed(
    either_parser_server: EmbeddedServer, sent: bytes
) -> None:
    got, closed = await _talk(either_parser_server, sent, wait_s=5.0)
    assert closed and got == b""
    async with httpx.AsyncClient(base_url=either_parser_server.url) as client:  # and the server still serves
        assert (await client.get("/health")).status_code == 200


async def test_a_connection_whose_request_arrived_whole_is_kept_past_the_read_timeout(
    either_parser_server: EmbeddedServer
) -> None:
    host, port = either_parser_server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        for i in range(2):  # the same connection, idle between its requests past the read timeout (0.5 s)
            if i:
                await asyncio.sleep(2.0)  # past the timeout and a sweep (once a second), within keep-alive (5 s)
            writer.write(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 ")
            length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                          if line.startswith(b"content-length:"))
            await asyncio.wait_for(reader.readexactly(length), 10)
    finally:
        writer.close()


async def _post_whole(srv: EmbeddedServer, body: bytes) -> bytes:
    """The answer to a completion request whose ``body`` is sent whole at once, as a proxy forwards it."""
    host, port = srv.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(_FRAMING + b"content-length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_a_body_past_the_limit_sent_whole_gets_its_413_not_a_reset(either_parser_server: EmbeddedServer) -> None:
    # Closing with the body's rest unread makes the kernel reset the connection, and a reset that reaches the
    # client first destroys the 413 it had not read yet (Envoy then reports its own 503 "reset" instead).
    either_parser_server.app.body_limit = 64 << 10
    body = b'{"prompt": "' + b"x" * (3 << 20) + b'"}'
    for _ in range(3):
        got = await _post_whole(either_parser_server, body)
        assert got.startswith(b"HTTP/1.1 413 "), got[:80]
        assert b"larger than 65536 bytes" in got


async def test_the_rest_of_a_refused_body_is_dropped_only_up_to_a_bound() -> None:
    given = 0

    async def endless() -> dict[str, Any]:  # a client that never stops sending
        nonlocal given
        given += 1
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}

    await asyncio.wait_for(api._drop_rest(endless, 10_000), 5)
    assert given == 11  # then the connection closes with the rest unread


class _Transport:
    """What ``close_stalled`` reads of a connection's transport."""

    def __init__(self, reading: bool) -> None:
        self.reading, self.closed = reading, False

    def is_reading(self) -> bool:
        return self.reading

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


class _Conn:
    def __init__(self, since: float | None, reading: bool = True) -> None:
        self.reading_since, self.transport = since, _Transport(reading)


def test_only_connections_late_with_their_request_are_closed() -> None:
    late, on_time, answering = _Conn(10.0), _Conn(19.5), _Conn(None)
    assert close_stalled([late, on_time, answering], now=20.0, timeout_s=5.0) == 1
    assert late.transport.closed and not on_time.transport.closed and not answering.transport.closed


def test_a_connection_the_server_stopped_reading_is_kept_and_its_clock_restarts() -> None:
    paused = _Conn(10.0, reading=False)  # flow control: the app has not taken in what arrived
    assert close_stalled([paused], now=20.0, timeout_s=5.0) == 0 and not paused.transport.closed
    paused.transport.reading = True  # resumed: from here the client alone is waited on
    assert close_stalled([paused], now=25.0, timeout_s=5.0) == 0
    assert close_stalled([paused], now=25.5, timeout_s=5.0) == 1 and paused.transport.closed


# -- a request body the app takes in slowly: reading paused by flow control is not the client being slow -------
T = TypeVar("T")


async def _until(found: Callable[[], T | None], what: str) -> T:
    """Poll until ``found()`` gives something (a slow host gets a generous deadline)."""
    deadline = time.monotonic() + 30
    while (got := found()) is None:
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.01)
    return got


class GatedApp:
    """An ASGI app that takes a request's body in only once ``let`` is set (an app slow to read it), then answers
    how many body bytes it read."""

    def __init__(self) -> None:
        self.let = asyncio.Event()
        self.received = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.let.wait()
        more = True
        while more:
            msg = await receive()
            self.received += len(msg.get("body", b""))
            more = msg.get("more_body", False)
        body = b"%d" % self.received
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(params=["httptools", "h11"])
async def gated(request: pytest.FixtureRequest) -> AsyncIterator[tuple[QuietServer, GatedApp]]:
    """The server's HTTP intake (each parser) and read-timeout sweep in front of a :class:`GatedApp`."""
    app = GatedApp()
    protocol = NoDelayH11Protocol if request.param == "h11" else _http_protocol()
    assert protocol is not NoDelayH11Protocol or request.param == "h11"
    srv = QuietServer(uvicorn.Config(app, host="127.0.0.1", port=free_port(), http=protocol, lifespan="off",
                                     access_log=False, log_level="warning"), read_timeout_s=30.0)
    task = asyncio.create_task(srv.serve())
    await _until(lambda: True if srv.started or task.done() else None, "the server started")
    if task.done():
        task.result()  # why it could not start
    try:
        yield srv, app
    finally:
        app.let.set()
        srv.should_exit = True
        with contextlib.suppress(Exception):
            await task


BIG = 1 << 20  # far past uvicorn's read high-water mark (64 KiB) and one socket read (256 KiB)


async def _post_paused(srv: QuietServer, sent: int, declared: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection, send a head declaring ``declared`` body bytes and ``sent`` of them at once, and wait until
    the server paused reading it (the app has not taken the body in: flow control)."""
    host, port = srv.config.host, srv.config.port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % declared + b"x" * sent)
    await _until(lambda: next((c for c in srv.server_state.connections if not c.transport.is_reading()), None),
                 "the server paused reading the body")
    return reader, writer


async def test_a_body_the_app_has_not_taken_in_yet_does_not_count_against_its_client(
    gated: tuple[QuietServer, GatedApp]
) -> None:
    srv, app = gated
    reader, writer = await _post_paused(srv, BIG, BIG)
    try:
        # an hour later by the sweep's clock, reading is still paused for the app: the client sent it all at once
        assert close_stalled(srv.server_state.connections, time.monotonic() + 3600, srv.read_timeout_s) == 0
        app.let.set()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert await asyncio.wait_for(reader.readexactly(len(b"%d" % BIG)), 30) == b"%d" % BIG
    finally:
        writer.close()


async def test_a_client_that_stops_sending_once_its_body_is_taken_in_is_still_cut_off(
    gated: tuple[QuietServer, GatedApp]
) -> None:
    srv, app = gated
    _, writer = await _post_paused(srv, BIG, 2 * BIG)  # half the body it announced, then nothing
    try:
        assert close_stalled(srv.server_state.connections, time.monotonic(), srv.read_timeout_s) == 0
        app.let.set()
        await _until(lambda: True if app.received == BIG else None, "the app took in what was sent")
        # reading resumed and waits on the client alone: past the timeout from now, the connection is closed
        assert close_stalled(srv.server_state.connections, time.monotonic() + srv.read_timeout_s + 1,
                             srv.read_timeout_s) == 1
    finally:
        writer.close()


async def test_a_large_body_behind_a_small_head_is_served(server: EmbeddedServer) -> None:
    body = json.dumps({"prompt": "hi", "max_tokens": 2, "pad": "x" * 300_000}).encode()  # read with the head
    async with httpx.AsyncClient(base_url=server.url) as client:
        r = await client.post(CMPL, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200


async def test_a_client_gone_before_its_non_streamed_answer_has_its_request_aborted() -> None:
    srv = EmbeddedServer(ServerOptions(port=free_port(), num_gpu_blocks=200, speedup=1.0, access_log=False))
    await srv.start()
    try:
        body = json.dumps({"prompt": "hi", "max_tokens": 2000, "ignore_eos": True}).encode()  # 20 s of decoding
        host, port = srv.url.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%b" % (len(body), body))
        while not srv.runner.streams:
            await asyncio.sleep(0.01)
        writer.close()
        for _ in range(300):
            if not srv.runner.streams:
                break
            await asyncio.sleep(0.01)
        assert not srv.runner.streams and not srv.runner.engine.scheduler.running
    finally:
        await srv.stop()


async def test_token_ids_of_the_emulated_model_past_the_shipped_tokenizer_are_served(http: httpx.AsyncClient) -> None:
    r = await http.post(CMPL, json={"prompt": [100_000, 128_255], "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200  # a trace of llama-3.1-8b's real ids replays as sent
