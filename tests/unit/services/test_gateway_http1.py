"""The picker's HTTP/1.1 framing for Envoy's ext_authz checks: every request on a kept-alive connection is
answered in order; what the framing cannot cut safely (bad lengths, endless heads, chunked bodies, a failing
answer) closes that connection and nothing else."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from bench.noop_authz import answer
from services.gateway import http1
from services.gateway.http1 import (
    MALFORMED,
    MAX_HEAD_BYTES,
    Answer,
    Connections,
    OneByOne,
    content_length,
    headers_of,
    response,
)


@asynccontextmanager
async def connected(reply: Answer, read_timeout_s: float = 30.0
                    ) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A live server answering with ``reply``, and one client connection to it."""
    server = await asyncio.get_running_loop().create_server(
        lambda: OneByOne(reply, read_timeout_s=read_timeout_s), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            yield reader, writer
        finally:
            writer.close()


def test_the_answer_allows_the_request_and_names_its_destination() -> None:
    assert answer("127.0.0.1:8001") == (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n"
                                        b"x-gateway-destination-endpoint: 127.0.0.1:8001\r\n\r\n")


def test_content_length_is_read_case_insensitively_and_absent_means_no_body() -> None:
    assert content_length(b"POST /x HTTP/1.1\r\nContent-Length: 12") == 12
    assert content_length(b"GET /health HTTP/1.1\r\nhost: a") == 0


def test_a_negative_huge_or_garbled_content_length_is_malformed() -> None:
    for value in (b"-5", b"12abc", b"", b"9" * 40, b"1e3", b" +4"):
        assert content_length(b"POST /x HTTP/1.1\r\ncontent-length: " + value) == MALFORMED
    assert content_length(b"POST /x HTTP/1.1\r\ncontent-length: 101", limit=100) == MALFORMED


def test_conflicting_lengths_and_any_transfer_encoding_are_malformed() -> None:
    assert content_length(b"POST /x HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 4") == MALFORMED
    assert content_length(b"POST /x HTTP/1.1\r\ncontent-length: 3\r\nContent-Length: 3") == 3
    assert content_length(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked") == MALFORMED


def test_headers_are_read_as_the_picker_reads_them() -> None:
    got = headers_of(b"POST /v1/chat/completions HTTP/1.1\r\nhost: p\r\nX-Gantry-Priority:  -1")
    assert got[":method"] == "POST" and got[":path"] == "/v1/chat/completions"
    assert got["x-gantry-priority"] == "-1"
    assert headers_of(b"garbage")[":method"] == ""


def test_a_response_carries_its_length_and_headers() -> None:
    assert response(429, b"{}", (("content-type", "application/json"),)) == (
        b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}")


def _ok(head: bytes, body: bytes) -> bytes:
    return response(200, body)


async def _closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server wrote before closing the connection. A reset counts as the close: a byte the client
    sent after the server closed (a trickling test races the close) draws one instead of a clean end of stream."""
    got = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 5):
            got += chunk
    except ConnectionResetError:
        pass
    return got


async def test_a_head_that_never_ends_closes_the_connection() -> None:
    async with connected(_ok) as (reader, writer):
        writer.write(b"POST /a HTTP/1.1\r\nx: " + b"y" * (MAX_HEAD_BYTES + 10))
        await writer.drain()
        assert await _closed(reader) == b""


async def test_a_body_over_the_limit_closes_the_connection_before_it_is_read() -> None:
    async with connected(_ok) as (reader, writer):
        writer.write(b"POST /a HTTP/1.1\r\ncontent-length: %d\r\n\r\n" % (1 << 40))
        await writer.drain()
        assert await _closed(reader) == b""


async def test_a_failing_answer_closes_only_its_connection() -> None:
    async def fail(head: bytes, body: bytes) -> bytes:
        if body == b"bad":
            raise RuntimeError("boom")
        return response(200, body)

    async with connected(fail) as (reader, writer):
        writer.write(b"POST /a HTTP/1.1\r\ncontent-length: 3\r\n\r\nbad")
        assert await _closed(reader) == b""
    async with connected(fail) as (reader, writer):  # the server goes on answering
        writer.write(b"POST /a HTTP/1.1\r\ncontent-length: 2\r\n\r\nok")
        assert (await asyncio.wait_for(reader.readuntil(b"ok"), 5)).startswith(b"HTTP/1.1 200")


async def test_pipelined_requests_wait_for_the_awaited_answer_before_them() -> None:
    async def slow_first(head: bytes, body: bytes) -> bytes:
        if body == b"1":
            await asyncio.sleep(0.05)
        return response(200, body)

    async with connected(slow_first) as (reader, writer):
        writer.write(b"POST /a HTTP/1.1\r\ncontent-length: 1\r\n\r\n1POST /b HTTP/1.1\r\ncontent-length: 1\r\n\r\n2")
        got = b""
        while not got.endswith(b"2"):
            got += await asyncio.wait_for(reader.read(1024), 5)
    assert got.index(b"\r\n\r\n1") < got.index(b"\r\n\r\n2")


async def test_a_client_pipelining_behind_an_awaited_answer_is_held_back_not_buffered_and_loses_nothing() -> None:
    release = asyncio.Event()
    conns: list[OneByOne] = []

    async def first_waits(head: bytes, body: bytes) -> bytes:
        if body == b"first":
            await release.wait()
        return response(200, body)

    def protocol() -> OneByOne:
        conns.append(OneByOne(first_waits, max_body=1024))
        return conns[-1]

    server = await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", 0)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        small = b"POST /n HTTP/1.1\r\ncontent-length: 4\r\n\r\nnext"
        many = 40_000  # ~1.6 MiB pipelined while the first answer waits
        writer.write(b"POST /f HTTP/1.1\r\ncontent-length: 5\r\n\r\nfirst" + small * many)
        await asyncio.sleep(0.5)  # the client keeps pushing until TCP stops it
        assert conns[0].paused
        held = len(conns[0].buf)
        assert held < MAX_HEAD_BYTES + 4 + 1024 + (1 << 18)  # one request's most and one read, not 1.6 MiB
        release.set()
        got = 0
        while got < many + 1:
            chunk = await asyncio.wait_for(reader.read(1 << 16), 10)
            assert chunk
            got += chunk.count(b"HTTP/1.1 200")
        writer.close()
    assert got == many + 1


async def test_a_malformed_head_closes_the_connection_without_an_answer() -> None:
    seen: list[bytes] = []

    def reply(head: bytes, body: bytes) -> bytes:
        seen.append(body)
        return b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"

    async with connected(reply) as (reader, writer):
        writer.write(b"POST /a HTTP/1.1\r\ncontent-length: -3\r\n\r\nabc")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(1024), 5) == b""  # closed, nothing answered
    assert seen == []


async def test_requests_on_one_connection_are_answered_in_order_even_when_split_across_reads() -> None:
    seen: list[bytes] = []

    def reply(head: bytes, body: bytes) -> bytes:
        seen.append(body)
        return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)

    async with connected(reply) as (reader, writer):
        first = b"POST /a HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello"
        second = b"POST /b HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc"
        writer.write(first[:20])  # the head arrives in pieces, then the rest with the next request
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(first[20:] + second)
        got = b""
        while got.count(b"\r\n\r\n") < 2 or not got.endswith(b"abc"):
            got += await asyncio.wait_for(reader.read(1024), 5)
    assert seen == [b"hello", b"abc"]
    assert got.index(b"hello") < got.index(b"abc")


async def test_an_awaited_answer_is_written_when_it_is_ready() -> None:
    async def later(_head: bytes, _body: bytes) -> bytes:
        await asyncio.sleep(0.01)
        return b"HTTP/1.1 204 No Content\r\n\r\n"

    async with connected(later) as (reader, writer):
        writer.write(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 204")


async def test_an_awaited_answer_whose_connection_closed_first_is_handed_back_unsent() -> None:
    gone = asyncio.Event()
    unsent: list[bytes] = []

    async def after_the_close(_head: bytes, body: bytes) -> bytes:
        await gone.wait()
        await asyncio.sleep(0.05)  # the server has seen the close by now
        return response(200, body)

    server = await asyncio.get_running_loop().create_server(
        lambda: OneByOne(after_the_close, unsent=unsent.append), "127.0.0.1", 0)
    async with server:
        _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        writer.write(b"POST /a HTTP/1.1\r\ncontent-length: 4\r\n\r\nlost")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.close()  # as Envoy does when its check times out
        gone.set()
        for _ in range(100):
            if unsent:
                break
            await asyncio.sleep(0.01)
    assert unsent == [response(200, b"lost")]


async def test_a_large_body_arriving_in_many_small_reads_costs_linear_time() -> None:
    protocols: list[OneByOne] = []
    answered: list[int] = []

    def make() -> OneByOne:
        protocols.append(OneByOne(lambda _h, body: answered.append(len(body)) or response(200)))
        return protocols[-1]

    server = await asyncio.get_running_loop().create_server(make, "127.0.0.1", 0)
    async with server:
        _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        while not protocols:
            await asyncio.sleep(0.01)
        size, piece = 16 << 20, b"x" * 4096
        cpu = time.thread_time()  # this thread only: threads other tests left running must not count
        # fed straight to the connection's protocol, so the reads are as small as a slow peer's would be
        protocols[0].data_received(b"POST /a HTTP/1.1\r\ncontent-length: %d\r\n\r\n" % size)
        for _ in range(size // len(piece)):
            protocols[0].data_received(piece)
        cpu = time.thread_time() - cpu
        writer.close()
    assert answered == [size]
    # copying the buffer once per read (quadratic) took several seconds of CPU here; linear takes ~10 ms
    assert cpu < 1.0, cpu


class Sink(asyncio.Transport):
    """A transport that keeps what is written (the connection driven by hand, read by read)."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def test_past_the_listeners_budget_the_connection_whose_bytes_would_pass_it_is_closed() -> None:
    conns = Connections(60.0, 10)
    conns.max_held = 1_000
    answered: list[int] = []
    a, b = (OneByOne(lambda _h, body: answered.append(len(body)) or response(200), conns=conns) for _ in range(2))
    ta, tb = Sink(), Sink()
    a.connection_made(ta)
    b.connection_made(tb)
    a.data_received(b"POST /a HTTP/1.1\r\ncontent-length: 900\r\n\r\n" + b"x" * 500)  # partial, 540 held
    b.data_received(b"POST /b HTTP/1.1\r\ncontent-length: 10\r\n\r\n")
    b.data_received(b"y" * 500)  # would pass 1,000: b goes, its bytes with it
    assert tb.closed and not ta.closed and conns.over_held == 1
    a.data_received(b"x" * 400)  # a's request is whole: answered, its bytes no longer held
    assert answered == [900] and conns.held == 0
    a.data_received(b"POST /a HTTP/1.1\r\ncontent-length: 9\r\n\r\nabc")
    a.connection_lost(None)
    assert conns.held == 0


async def test_a_body_trickled_behind_a_large_head_reads_that_head_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # each read parsed the whole head again: 1.5 ms of CPU per 1-byte read behind a 60 KiB head
    reads: list[int] = []
    real = http1.content_length

    def counted(head: bytes | bytearray, limit: int = http1.MAX_BODY_BYTES) -> int:
        reads.append(len(head))
        return real(head, limit)

    monkeypatch.setattr(http1, "content_length", counted)
    answered: list[int] = []
    conn = OneByOne(lambda _h, body: answered.append(len(body)) or response(200))
    conn.connection_made(Sink())
    padding = b"".join(b"x-pad-%d: y\r\n" % i for i in range(4000))
    conn.data_received(b"POST /a HTTP/1.1\r\n" + padding + b"content-length: 500\r\n\r\n")
    for _ in range(500):
        conn.data_received(b"b")
    assert answered == [500] and len(reads) == 1


@pytest.mark.parametrize("sent", [b"POST /a HTTP/1.1\r\ncontent-le",
                                  b"POST /a HTTP/1.1\r\ncontent-length: 10\r\n\r\nabc"],
                         ids=["half a head", "a body shorter than its length"])
async def test_a_request_not_whole_in_time_closes_the_connection(sent: bytes) -> None:
    async with connected(_ok, read_timeout_s=0.2) as (reader, writer):
        writer.write(sent)
        assert await _closed(reader) == b""


async def test_a_request_trickled_a_byte_at_a_time_is_closed_when_its_time_is_up() -> None:
    request = b"POST /a HTTP/1.1\r\ncontent-length: 2\r\n\r\nok"
    async with connected(_ok, read_timeout_s=0.3) as (reader, writer):
        t0 = time.perf_counter()
        for byte in request[:-1]:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.02)  # each byte in time, the whole too slow
            if reader.at_eof() or writer.is_closing():
                break
        assert await _closed(reader) == b"" and time.perf_counter() - t0 < 3


async def test_an_idle_connection_and_whole_requests_are_not_timed_out() -> None:
    async with connected(_ok, read_timeout_s=0.2) as (reader, writer):
        await asyncio.sleep(0.4)  # idle, nothing buffered: Envoy pools such connections
        for _ in range(2):
            writer.write(b"POST /a HTTP/1.1\r\ncontent-length: 2\r\n\r\nok")
            assert (await asyncio.wait_for(reader.readuntil(b"ok"), 5)).startswith(b"HTTP/1.1 200")
            await asyncio.sleep(0.3)


async def test_a_request_begun_behind_a_late_but_whole_one_gets_its_own_time() -> None:
    first = b"POST /a HTTP/1.1\r\ncontent-length: 2\r\n\r\nok"
    second = first.replace(b"/a", b"/b")
    async with connected(_ok, read_timeout_s=0.4) as (reader, writer):
        writer.write(first[:10])
        await asyncio.sleep(0.25)
        writer.write(first[10:] + second[:10])  # the first whole in time, the second begun
        await asyncio.sleep(0.25)  # past the first's deadline, within the second's
        writer.write(second[10:])
        for _ in range(2):
            assert (await asyncio.wait_for(reader.readuntil(b"ok"), 5)).startswith(b"HTTP/1.1 200")


CHECK = b"POST /a HTTP/1.1\r\ncontent-length: 2\r\n\r\nok"


@asynccontextmanager
async def bounded(reply: Answer, conns: Connections) -> AsyncIterator[int]:
    """A live server answering with ``reply``, its connections kept by ``conns``; yields its port."""
    server = await asyncio.get_running_loop().create_server(lambda: OneByOne(reply, conns=conns), "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def _answered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(CHECK)
    return await asyncio.wait_for(reader.readuntil(b"ok"), 5)


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll until ``condition`` holds (a slow host gets the whole ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.01)


async def test_a_connection_idle_longer_than_the_idle_timeout_is_closed() -> None:
    conns = Connections(idle_timeout_s=0.2, max_connections=8)
    sweeping = asyncio.create_task(conns.sweep_forever())
    try:
        async with bounded(_ok, conns) as port:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            t0 = time.monotonic()  # before the connection's last activity (its answer)
            assert (await _answered(reader, writer)).startswith(b"HTTP/1.1 200")
            assert await _closed(reader) == b""  # closed by the picker, nothing more written
            assert time.monotonic() - t0 >= 0.2  # never before the idle timeout
            writer.close()
            await _until(lambda: not conns.open)
    finally:
        sweeping.cancel()
    assert conns.idle_closed == 1


async def test_a_connection_is_closed_only_after_a_whole_idle_timeout_without_a_byte() -> None:
    conns = Connections(idle_timeout_s=10.0, max_connections=8)
    async with bounded(_ok, conns) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _until(lambda: len(conns.open) == 1)
        now = time.monotonic()
        conns.sweep(now)
        conns.sweep(now + 9.9)  # quiet, but not yet for the whole timeout
        assert (await _answered(reader, writer)).startswith(b"HTTP/1.1 200")  # activity: its idle time restarts
        conns.sweep(now + 15)
        conns.sweep(now + 24.9)
        assert (await _answered(reader, writer)).startswith(b"HTTP/1.1 200")
        conns.sweep(now + 30)
        conns.sweep(now + 40)
        assert await _closed(reader) == b""
        writer.close()


async def test_a_connection_whose_answer_is_awaited_is_not_closed_by_the_idle_sweep() -> None:
    release = asyncio.Event()
    conns = Connections(idle_timeout_s=1.0, max_connections=8)

    async def waits(_head: bytes, body: bytes) -> bytes:
        await release.wait()
        return response(200, body)

    async with bounded(waits, conns) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(CHECK)
        await _until(lambda: len(conns.open) == 1 and next(iter(conns.open)).busy)
        now = time.monotonic()
        for later in (0, 100, 200, 300):  # the answer is awaited far past the idle timeout
            conns.sweep(now + later)
        release.set()
        assert (await asyncio.wait_for(reader.readuntil(b"ok"), 5)).startswith(b"HTTP/1.1 200")
        conns.sweep(now + 301)  # the answer just left: its idle time starts now
        assert (await _answered(reader, writer)).startswith(b"HTTP/1.1 200")
        writer.close()
    assert conns.idle_closed == 0


async def test_a_request_in_progress_is_left_to_the_read_timeout_not_the_idle_sweep() -> None:
    conns = Connections(idle_timeout_s=1.0, max_connections=8)
    async with bounded(_ok, conns) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(CHECK[:10])
        await _until(lambda: len(conns.open) == 1 and bool(next(iter(conns.open)).buf))
        now = time.monotonic()
        for later in (0, 100, 200):
            conns.sweep(now + later)
        writer.write(CHECK[10:])
        assert (await asyncio.wait_for(reader.readuntil(b"ok"), 5)).startswith(b"HTTP/1.1 200")
        writer.close()
    assert conns.idle_closed == 0


async def test_past_the_cap_a_new_connection_is_closed_at_once_and_the_open_ones_keep_being_answered() -> None:
    conns = Connections(idle_timeout_s=60.0, max_connections=2)
    async with bounded(_ok, conns) as port:
        first = await asyncio.open_connection("127.0.0.1", port)
        second = await asyncio.open_connection("127.0.0.1", port)
        await _until(lambda: len(conns.open) == 2)
        extra_reader, extra_writer = await asyncio.open_connection("127.0.0.1", port)
        extra_writer.write(CHECK)
        assert await _closed(extra_reader) == b""  # refused: closed without an answer
        assert conns.refused == 1
        for reader, writer in (first, second, first):
            assert (await _answered(reader, writer)).startswith(b"HTTP/1.1 200")
        first[1].close()  # a place frees up: the next connection is taken
        await _until(lambda: len(conns.open) == 1)
        again = await asyncio.open_connection("127.0.0.1", port)
        assert (await _answered(*again)).startswith(b"HTTP/1.1 200")
        for _, writer in (second, again):
            writer.close()
        extra_writer.close()


async def test_an_idle_connection_that_never_reads_its_answers_is_closed_once_and_frees_its_place() -> None:
    conns = Connections(idle_timeout_s=10.0, max_connections=8)
    big = response(200, b"x" * (16 << 20))  # more than the sockets' buffers take
    async with bounded(lambda _head, _body: big, conns) as port:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window the kernel does not grow
        sock.connect(("127.0.0.1", port))
        _reader, writer = await asyncio.open_connection(sock=sock)  # never read: the answers stay unsent
        writer.write(CHECK)
        await _until(lambda: len(conns.open) == 1 and not next(iter(conns.open)).buf)
        now = time.monotonic()
        for later in (0, 10, 20, 30):  # idle from the first sweep on; closed at the second
            conns.sweep(now + later)
        await _until(lambda: not conns.open)  # its descriptor is not held waiting for a reader that never comes
        writer.close()
    assert conns.idle_closed == 1


async def test_a_client_that_does_not_read_its_answers_is_held_back_not_buffered_and_loses_nothing() -> None:
    conns: list[OneByOne] = []
    big = response(200, b"x" * (64 << 10))

    def protocol() -> OneByOne:
        conns.append(OneByOne(lambda _head, _body: big))
        return conns[-1]

    server = await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", 0)
    async with server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window the kernel does not grow
        sock.connect(server.sockets[0].getsockname())
        reader, writer = await asyncio.open_connection(sock=sock)
        many = 200  # 12.5 MiB of answers asked for in 3.6 KiB of requests, none of them read yet
        writer.write(b"GET /x HTTP/1.1\r\n\r\n" * many)
        await _until(lambda: bool(conns) and conns[0].transport is not None and not conns[0].transport.is_reading())
        transport = conns[0].transport
        assert transport is not None and transport.get_write_buffer_size() < 1 << 20  # a few answers, not 12 MiB
        got = b""
        while len(got) < many * len(big):
            chunk = await asyncio.wait_for(reader.read(1 << 16), 10)
            assert chunk
            got += chunk
        writer.close()
    assert got == big * many
