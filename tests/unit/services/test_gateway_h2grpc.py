"""The picker's own HTTP/2 gRPC server (``services.gateway.h2grpc``): what a real gRPC client gets from it
(grpcio's), and what a broken or hostile peer gets (raw frames): a clear HTTP/2 or gRPC error for that peer or
call alone, never a dead server, a stalled call beside it or unbounded memory."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import hpack
import pytest

from services.gateway import h2frames as f
from services.gateway import h2grpc
from services.gateway.calls import HEALTH_CHECK, SERVING, health_call
from services.gateway.h2grpc import H2Connection
from services.gateway.h2stream import CallError
from services.gateway.http1 import Connections

MAX_MESSAGE = 1 << 20
ENDED: list[str] = []  # calls whose handler saw its end (normal or cancelled)


async def _echo(requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for msg in requests:
            if msg == b"boom":
                raise RuntimeError("handler bug")
            if msg == b"refuse":
                raise CallError(9, "refused by the handler")
            yield msg
    finally:
        ENDED.append("echo")


async def _slow(requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for _ in requests:
            await asyncio.sleep(3600)
        yield b""
    finally:
        ENDED.append("slow")


METHODS = {"/t.Echo/Stream": _echo, "/t.Echo/Slow": _slow, HEALTH_CHECK: health_call}


@asynccontextmanager
async def serving(max_connections: int = 64) -> AsyncIterator[int]:
    """The server on a free port with the test methods; yields the port."""
    conns = Connections(60.0, max_connections)
    server = await asyncio.get_running_loop().create_server(lambda: H2Connection(METHODS, conns, MAX_MESSAGE),
                                                            "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def _echo_once(port: int, payload: bytes = b"still here") -> bytes:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.stream_stream("/t.Echo/Stream")()
        await call.write(payload)
        got = await call.read()
        await call.done_writing()
        assert isinstance(got, bytes)
        return got


# --- a real gRPC client ------------------------------------------------------------------------------------


async def test_a_health_check_is_answered_serving() -> None:
    async with serving() as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        check = ch.unary_unary(HEALTH_CHECK, request_serializer=bytes, response_deserializer=bytes)
        assert await check(b"", timeout=5) == SERVING


async def test_a_stream_call_gets_its_answers_in_order_and_ends_ok() -> None:
    async with serving() as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.stream_stream("/t.Echo/Stream")()
        for i in range(50):
            await call.write(b"m%d" % i)
            assert await call.read() == b"m%d" % i
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK


async def test_a_message_larger_than_the_windows_and_frames_arrives_whole() -> None:
    big = random.Random(1).randbytes(MAX_MESSAGE - 100)  # incompressible, made at once (not byte by byte)
    async with serving() as port:
        assert await _echo_once(port, big) == big


async def test_many_calls_at_once_on_one_connection_each_get_their_own_answers() -> None:
    async with serving() as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        async def one(i: int) -> bytes:
            call = ch.stream_stream("/t.Echo/Stream")()
            await call.write(b"%d" % i)
            got = await call.read()
            await call.done_writing()
            assert isinstance(got, bytes)
            return got

        assert await asyncio.gather(*(one(i) for i in range(200))) == [b"%d" % i for i in range(200)]


async def test_an_unknown_method_is_unimplemented() -> None:
    async with serving() as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary("/t.Nope/X", request_serializer=bytes, response_deserializer=bytes)(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_message_over_the_limit_fails_that_call_only() -> None:
    async with serving() as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.stream_stream("/t.Echo/Stream")()
        await call.write(b"x" * (MAX_MESSAGE + 1))
        assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await _echo_once(port) == b"still here"


async def test_a_failing_handler_ends_its_call_internal_and_the_server_serves_on() -> None:
    async with serving() as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.stream_stream("/t.Echo/Stream")()
        await call.write(b"boom")
        assert await call.code() == grpc.StatusCode.INTERNAL
        refused = ch.stream_stream("/t.Echo/Stream")()
        await refused.write(b"refuse")
        assert await refused.code() == grpc.StatusCode.FAILED_PRECONDITION  # the handler's own status (9)
        assert await refused.details() == "refused by the handler"
        assert await _echo_once(port) == b"still here"


async def test_a_call_the_client_cancels_ends_its_handler() -> None:
    ENDED.clear()
    async with serving() as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.stream_stream("/t.Echo/Slow")()
        await call.write(b"wait")
        await asyncio.sleep(0.2)
        call.cancel()
        for _ in range(100):
            if "slow" in ENDED:
                break
            await asyncio.sleep(0.02)
        assert "slow" in ENDED  # its finally ran: a picker's books for the request are closed


# --- raw frames ---------------------------------------------------------------------------------------------


class Peer:
    """A hand-driven HTTP/2 client: frames out as given, frames in as they come."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder = hpack.Encoder()
        self.buf = b""

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))

    def headers(self, sid: int, path: str = "/t.Echo/Stream", flags: int = f.END_HEADERS) -> bytes:
        block = self.encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", path),
                                     (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers")])
        return f.frame(f.HEADERS, flags, sid, block)

    async def frames(self, timeout: float = 5.0) -> list[tuple[int, int, int, bytes]]:
        """Frames until the server closes the connection (or ``timeout`` passes quietly)."""
        out = []
        while True:
            try:
                chunk = await asyncio.wait_for(self.reader.read(65536), timeout)
            except TimeoutError:
                break
            self.buf += chunk
            while len(self.buf) >= 9 and len(self.buf) >= 9 + int.from_bytes(self.buf[:3], "big"):
                n = int.from_bytes(self.buf[:3], "big")
                out.append((self.buf[3], self.buf[4], int.from_bytes(self.buf[5:9], "big"), self.buf[9:9 + n]))
                self.buf = self.buf[9 + n:]
            if not chunk:
                break
        return out

    async def until(self, kind: int, timeout: float = 5.0) -> tuple[int, int, int, bytes]:
        """The next frame of ``kind`` (others skipped)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end:
            while len(self.buf) >= 9 and len(self.buf) >= 9 + int.from_bytes(self.buf[:3], "big"):
                n = int.from_bytes(self.buf[:3], "big")
                got = (self.buf[3], self.buf[4], int.from_bytes(self.buf[5:9], "big"), self.buf[9:9 + n])
                self.buf = self.buf[9 + n:]
                if got[0] == kind:
                    return got
            chunk = await asyncio.wait_for(self.reader.read(65536), end - loop.time())
            if not chunk:
                break
            self.buf += chunk
        raise AssertionError(f"no frame of type {kind}")


@asynccontextmanager
async def peer(port: int, settings: dict[int, int] | None = None) -> AsyncIterator[Peer]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f.PREFACE + f.settings(settings or {}))
    try:
        yield Peer(reader, writer)
    finally:
        writer.close()


def _goaway_code(frames: list[tuple[int, int, int, bytes]]) -> int | None:
    codes = [int.from_bytes(p[4:8], "big") for kind, _, _, p in frames if kind == f.GOAWAY]
    return codes[0] if codes else None


async def test_a_peer_without_the_http2_preface_is_closed() -> None:
    async with serving() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        got = await asyncio.wait_for(reader.read(), 5)  # read to the close
        types, at = [], 0
        while at < len(got):
            types.append(got[at + 3])
            at += 9 + int.from_bytes(got[at:at + 3], "big")
        assert types == [f.SETTINGS, f.WINDOW_UPDATE]  # only the server's preface, sent as it accepted
        writer.close()
        assert await _echo_once(port) == b"still here"


@pytest.mark.parametrize(("name", "frames", "code"), [
    ("a frame over the size we allow", [b"\xff\xff\xff" + bytes((f.DATA, 0)) + (1).to_bytes(4, "big")],
     f.FRAME_SIZE_ERROR),
    ("DATA on a stream never opened", [f.frame(f.DATA, 0, 5, b"\x00\x00\x00\x00\x00")], f.PROTOCOL_ERROR),
    ("a header block that does not decode", [f.frame(f.HEADERS, f.END_HEADERS, 1, b"\xff\xff\xff\xff\xff")],
     f.COMPRESSION_ERROR),
    ("a stream id a client may not use", [f.frame(f.HEADERS, f.END_HEADERS, 2, b"\x83")], f.PROTOCOL_ERROR),
    ("a push from the client", [f.frame(f.PUSH_PROMISE, f.END_HEADERS, 1, b"\x00\x00\x00\x02")],
     f.PROTOCOL_ERROR),
    ("a SETTINGS frame of a bad length", [f.frame(f.SETTINGS, 0, 0, b"\x00\x04\x00")], f.FRAME_SIZE_ERROR),
    ("a window over 2^31 - 1", [f.settings({f.INITIAL_WINDOW_SIZE: 2**31})], f.FLOW_CONTROL_ERROR),
    ("a zero window increment", [f.window_update(0, 0)], f.PROTOCOL_ERROR),
    ("a connection window pushed past 2^31 - 1", [f.window_update(0, 2**31 - 1)], f.FLOW_CONTROL_ERROR),
    ("a CONTINUATION with no HEADERS before it", [f.frame(f.CONTINUATION, f.END_HEADERS, 1, b"\x83")],
     f.PROTOCOL_ERROR),
    ("a RST_STREAM on stream 0", [f.rst_stream(0, 0)], f.PROTOCOL_ERROR),
    ("a PING of a bad length", [f.frame(f.PING, 0, 0, b"1234")], f.FRAME_SIZE_ERROR),
])
async def test_a_broken_peer_is_sent_goaway_with_the_error_and_the_server_serves_on(
        name: str, frames: list[bytes], code: int) -> None:
    async with serving() as port:
        async with peer(port) as p:
            p.send(*frames)
            assert _goaway_code(await p.frames()) == code, name
        assert await _echo_once(port) == b"still here"


async def test_a_header_block_interrupted_by_another_frame_is_a_protocol_error() -> None:
    async with serving() as port, peer(port) as p:
        block = p.headers(1, flags=0)  # no END_HEADERS: a CONTINUATION must follow
        p.send(block, f.frame(f.PING, 0, 0, b"12345678"))
        assert _goaway_code(await p.frames()) == f.PROTOCOL_ERROR


async def test_a_header_block_split_over_continuations_is_one_call() -> None:
    async with serving() as port, peer(port) as p:
        whole = p.headers(1)[9:]
        p.send(f.frame(f.HEADERS, 0, 1, whole[:3]), f.frame(f.CONTINUATION, 0, 1, whole[3:6]),
               f.frame(f.CONTINUATION, f.END_HEADERS, 1, whole[6:]),
               f.frame(f.DATA, f.END_STREAM, 1, f.message(b"hello")))
        data = await p.until(f.DATA)
        assert data[2] == 1 and data[3] == f.message(b"hello")


async def test_a_ping_is_answered_with_its_own_payload() -> None:
    async with serving() as port, peer(port) as p:
        p.send(f.frame(f.PING, 0, 0, b"abcdefgh"))
        _, flags, _, payload = await p.until(f.PING)
        assert flags & f.ACK and payload == b"abcdefgh"


async def test_answers_wait_for_the_peers_window_and_flow_when_it_opens() -> None:
    async with serving() as port, peer(port, {f.INITIAL_WINDOW_SIZE: 4}) as p:
        p.send(p.headers(1), f.frame(f.DATA, 0, 1, f.message(b"0123456789")))
        first = await p.until(f.DATA)
        assert first[3] == f.message(b"0123456789")[:4]  # the 4 bytes the window allows
        p.send(f.window_update(1, 100))
        rest = await p.until(f.DATA)
        assert first[3] + rest[3] == f.message(b"0123456789")


async def test_data_beyond_the_streams_window_resets_that_stream_with_a_flow_control_error() -> None:
    async with serving() as port:
        conns = Connections(60.0, 4)
        server = await asyncio.get_running_loop().create_server(lambda: H2Connection(METHODS, conns, 8),
                                                                "127.0.0.1", 0)  # windows of 8 + 5 + 1024 bytes
        small = server.sockets[0].getsockname()[1]
        async with peer(small) as p:
            p.send(p.headers(1), f.frame(f.DATA, 0, 1, bytes(2000)))
            _, _, sid, payload = await p.until(f.RST_STREAM)
            assert sid == 1 and int.from_bytes(payload, "big") == f.FLOW_CONTROL_ERROR
        server.close()
        assert await _echo_once(port) == b"still here"


async def test_a_compressed_message_fails_its_call_and_not_the_connection() -> None:
    async with serving() as port, peer(port) as p:
        p.send(p.headers(1), f.frame(f.DATA, 0, 1, b"\x01\x00\x00\x00\x01z"))
        _, flags, sid, block = await p.until(f.HEADERS)
        assert sid == 1 and flags & f.END_STREAM
        assert (b"grpc-status", b"13") in [(bytes(k), bytes(v)) for k, v in hpack.Decoder().decode(block, raw=True)]
        p.send(p.headers(3), f.frame(f.DATA, f.END_STREAM, 3, f.message(b"next")))
        data = await p.until(f.DATA)
        assert data[2] == 3 and data[3] == f.message(b"next")


async def test_calls_past_the_concurrent_limit_are_refused_and_the_open_ones_go_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h2grpc, "MAX_STREAMS", 2)
    async with serving() as port, peer(port) as p:
        p.send(p.headers(1, "/t.Echo/Slow"), p.headers(3, "/t.Echo/Slow"), p.headers(5, "/t.Echo/Slow"))
        _, _, sid, payload = await p.until(f.RST_STREAM)
        assert sid == 5 and int.from_bytes(payload, "big") == f.REFUSED_STREAM


async def test_a_peer_resetting_calls_faster_than_the_limit_is_sent_goaway(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h2grpc, "MAX_RESETS", 20)
    async with serving() as port:
        async with peer(port) as p:
            p.send(*(p.headers(sid) + f.rst_stream(sid, f.CANCEL) for sid in range(1, 80, 2)))
            assert _goaway_code(await p.frames()) == f.ENHANCE_YOUR_CALM
        assert await _echo_once(port) == b"still here"


async def test_random_bytes_after_the_preface_never_take_the_server_down() -> None:
    rng = random.Random(7)
    async with serving() as port:
        for _ in range(40):
            async with peer(port) as p:
                garbage = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 400)))
                p.send(p.headers(1), garbage)
                await p.frames(timeout=0.2)
        assert await _echo_once(port) == b"still here"


class _Transport(asyncio.Transport):
    """A transport that keeps what is written (for a peer that reads nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.out = b""
        self.closed = False
        self.aborted = False
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += bytes(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False  # what the peer sent before is already read (the test feeds it)

    def resume_reading(self) -> None:
        self.reading = True


def test_a_peer_asking_for_pings_while_not_reading_is_sent_goaway_and_closed() -> None:
    conn = H2Connection(METHODS, Connections(60.0, 4), MAX_MESSAGE)
    tr = _Transport()
    conn.connection_made(tr)
    conn.data_received(f.PREFACE + f.settings({}))
    conn.pause_writing()  # the transport's buffer is past its high-water mark: the peer is not reading
    conn.data_received(f.frame(f.PING, 0, 0, b"12345678") * h2grpc.MAX_UNREAD_CONTROL)
    assert not tr.closed  # a slow reader's pings are still answered, up to a point
    conn.data_received(f.frame(f.PING, 0, 0, b"12345678"))
    assert tr.closed and f.goaway(0, f.ENHANCE_YOUR_CALM, b"not reading") in tr.out


async def test_a_frame_left_partial_closes_the_connection_after_the_read_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h2grpc, "READ_TIMEOUT_S", 0.2)
    async with serving() as port:
        async with peer(port) as p:
            p.send(b"\x00\x00\x10\x00")  # 4 bytes of a frame header, then silence
            assert _goaway_code(await p.frames(timeout=3)) == f.PROTOCOL_ERROR
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"PRI * HT")  # part of the preface, then silence
        await asyncio.wait_for(reader.read(), 3)  # closed
        writer.close()
        assert await _echo_once(port) == b"still here"


@pytest.mark.parametrize(("name", "frames"), [
    ("a SETTINGS frame of too many entries", lambda: [f.frame(f.SETTINGS, 0, 0, b"\x00\x09\x00\x00\x00\x00" * 33)]),
    ("SETTINGS frames faster than the budget", lambda: [f.settings({f.INITIAL_WINDOW_SIZE: 100})] * 1001),
    ("PINGs faster than the budget", lambda: [f.frame(f.PING, 0, 0, b"12345678")] * 1001),
])
async def test_a_peer_flooding_control_frames_is_sent_goaway(name: str, frames: object) -> None:
    async with serving() as port, peer(port) as p:
        assert callable(frames)
        p.send(*frames())
        assert _goaway_code(await p.frames()) == f.ENHANCE_YOUR_CALM, name


async def test_partial_messages_count_against_the_connections_bytes_held(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h2grpc, "MAX_BUFFERED", 100_000)
    async with serving() as port, peer(port) as p:
        # each call begins a message of 100 kB and sends 30 kB of it: none is whole, all are held
        p.send(*(p.headers(sid) + f.frame(f.DATA, 0, sid, (100_000).to_bytes(5, "big") + bytes(30_000))
                 for sid in (1, 3, 5, 7)))
        assert _goaway_code(await p.frames()) == f.ENHANCE_YOUR_CALM


async def test_a_handler_is_not_asked_for_its_next_answer_while_the_peer_takes_none() -> None:
    asked: list[int] = []

    async def counting(requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for msg in requests:
            asked.append(len(msg))
            yield msg

    conns = Connections(60.0, 4)
    server = await asyncio.get_running_loop().create_server(
        lambda: H2Connection({"/t.Echo/Stream": counting}, conns, MAX_MESSAGE), "127.0.0.1", 0)
    async with peer(server.sockets[0].getsockname()[1], {f.INITIAL_WINDOW_SIZE: 0}) as p:
        p.send(p.headers(1), *(f.frame(f.DATA, 0, 1, f.message(b"x" * 100)) for _ in range(5)))
        await p.until(f.HEADERS)  # the answer's headers went; its data waits for window
        await asyncio.sleep(0.2)
        assert asked == [100]  # the second message is not taken: its answer would pile up unsent
        p.send(f.window_update(1, 10_000))
        await p.until(f.DATA)
        for _ in range(50):
            if len(asked) == 5:
                break
            await asyncio.sleep(0.02)
        assert asked == [100] * 5
    server.close()


async def test_a_whole_message_of_the_largest_size_fits_after_smaller_ones() -> None:
    async with serving() as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.stream_stream("/t.Echo/Stream")()
        for payload in (b"s" * 2000, b"b" * (MAX_MESSAGE - 10), b"t" * 3000, b"c" * MAX_MESSAGE):
            await call.write(payload)
            assert await call.read() == payload
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK


async def test_calls_failed_for_their_errors_count_as_resets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h2grpc, "MAX_RESETS", 20)
    async with serving() as port, peer(port) as p:
        # each call sends a compressed message: we end it and reset it, which the peer made us do
        p.send(*(p.headers(sid) + f.frame(f.DATA, 0, sid, b"\x01\x00\x00\x00\x01z") for sid in range(1, 80, 2)))
        assert _goaway_code(await p.frames()) == f.ENHANCE_YOUR_CALM


async def test_a_handler_raising_cancelled_error_uncancelled_ends_its_call_internal() -> None:
    async def inner_cancelled(requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for _ in requests:
            fut = asyncio.get_running_loop().create_future()
            fut.cancel()
            await fut  # CancelledError, though nobody cancelled the call's task
        yield b""

    conns = Connections(60.0, 4)
    made: list[H2Connection] = []

    def conn() -> H2Connection:
        made.append(H2Connection({"/t.X/Y": inner_cancelled}, conns, MAX_MESSAGE))
        return made[-1]

    server = await asyncio.get_running_loop().create_server(conn, "127.0.0.1", 0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.sockets[0].getsockname()[1]}") as ch:
        call = ch.stream_stream("/t.X/Y")()
        await call.write(b"go")
        assert await call.code() == grpc.StatusCode.INTERNAL
        assert made[0].streams == {} and not made[0].busy  # nothing left open: the connection can go idle
    server.close()


def _fed(conn: H2Connection, tr: _Transport, settings: dict[int, int] | None = None) -> None:
    conn.connection_made(tr)
    conn.data_received(f.PREFACE + f.settings(settings or {}))


def _call_frames(enc: hpack.Encoder, sid: int, path: str = "/t.Echo/Stream") -> bytes:
    return f.frame(f.HEADERS, f.END_HEADERS, sid, enc.encode([(":method", "POST"), (":path", path),
                                                             ("content-type", "application/grpc")]))


async def test_a_connection_window_update_serves_waiting_calls_only_as_far_as_it_reaches() -> None:
    conn, tr, enc = H2Connection(METHODS, Connections(60.0, 4), MAX_MESSAGE), _Transport(), hpack.Encoder()
    _fed(conn, tr)
    conn.send_window = 0  # the peer has granted the connection nothing more
    for sid in range(1, 200, 2):
        conn.data_received(_call_frames(enc, sid) + f.frame(f.DATA, 0, sid, f.message(b"0123456789")))
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(conn.conn_blocked) == 100
    before = len(tr.out)
    conn.data_received(f.window_update(0, 15))  # one whole answer (5 + 10 bytes), no more
    assert len(conn.conn_blocked) == 99  # the first call's answer left; the others still wait, untouched
    assert len(tr.out) - before < 100
    conn.connection_lost(None)


def test_the_peers_initial_window_grown_too_often_is_sent_goaway() -> None:
    conn, tr = H2Connection(METHODS, Connections(60.0, 4), MAX_MESSAGE), _Transport()
    _fed(conn, tr)
    for size in range(70_000, 70_000 + h2grpc.MAX_WINDOW_CHANGES + 1):
        conn.data_received(f.settings({f.INITIAL_WINDOW_SIZE: size}))  # each one larger: each walks the waiting
    assert tr.closed and f.goaway(0, f.ENHANCE_YOUR_CALM, b"initial window changed too often") in tr.out


async def test_a_peer_not_reading_is_not_read_and_its_close_is_an_abort() -> None:
    conn, tr, enc = H2Connection(METHODS, Connections(60.0, 4), MAX_MESSAGE), _Transport(), hpack.Encoder()
    _fed(conn, tr)
    conn.data_received(_call_frames(enc, 1, "/t.Echo/Slow") + f.frame(f.DATA, 0, 1, f.message(b"x")))
    await asyncio.sleep(0)
    conn.pause_writing()
    assert not tr.reading  # nothing more is read until it reads: no answers owed to it pile up
    conn.close()  # the idle sweep, or an error: it must not wait for a peer that never reads
    await asyncio.sleep(0)
    assert tr.aborted and "slow" in ENDED  # its call's handler ended too


async def test_tiny_messages_count_against_the_connections_bound_beyond_their_bytes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h2grpc, "MAX_BUFFERED", 64 * 100)
    conn, tr, enc = H2Connection(METHODS, Connections(60.0, 4), MAX_MESSAGE), _Transport(), hpack.Encoder()
    _fed(conn, tr)
    conn.data_received(_call_frames(enc, 1, "/t.Echo/Slow") + f.frame(f.DATA, 0, 1, f.message(b"")))
    await asyncio.sleep(0)  # the handler sleeps on its first message: the rest queue up
    conn.data_received(f.frame(f.DATA, 0, 1, f.message(b"") * 120))  # 600 bytes on the wire
    assert tr.closed and f.goaway(1, f.ENHANCE_YOUR_CALM, b"too many unread bytes") in tr.out


async def test_envoys_close_of_an_answered_call_is_not_counted_as_a_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h2grpc, "MAX_RESETS", 5)
    conn, tr, enc = H2Connection(METHODS, Connections(60.0, 4), MAX_MESSAGE), _Transport(), hpack.Encoder()
    _fed(conn, tr)
    for sid in range(1, 60, 2):
        conn.data_received(_call_frames(enc, sid) + f.frame(f.DATA, 0, sid, f.message(b"m")))
        for _ in range(3):
            await asyncio.sleep(0)  # the answer leaves
        conn.data_received(f.frame(f.DATA, f.END_STREAM, sid, b"") + f.rst_stream(sid, f.CANCEL))  # as Envoy ends it
    assert not tr.closed


async def test_a_padded_message_of_the_largest_size_still_fits_its_window() -> None:
    conn, tr, enc = H2Connection(METHODS, Connections(60.0, 4), 40_000), _Transport(), hpack.Encoder()
    _fed(conn, tr)
    whole = f.message(b"p" * 40_000)
    chunks = [whole[i:i + 200] for i in range(0, len(whole), 200)]  # 201 frames, each padded with 255 bytes
    conn.data_received(_call_frames(enc, 1) + b"".join(
        f.frame(f.DATA, f.PADDED, 1, bytes((255,)) + c + bytes(255)) for c in chunks))
    for _ in range(5):
        await asyncio.sleep(0)
    assert tr.out.count(b"p") >= 40_000  # echoed whole (no reset): the padding never held its window
    conn.connection_lost(None)


async def test_a_small_header_block_that_decodes_huge_is_a_compression_error() -> None:
    # HPACK bomb: one 4,000-byte value put in the table, then referenced 2,000 times (one byte each): 2 kB on the
    # wire, 8 MB decoded
    stored = hpack.Encoder().encode([("x-big", "v" * 4000)], huffman=False)  # indexed on the way: entry 62
    async with serving() as port:
        async with peer(port) as p:
            p.send(f.frame(f.HEADERS, f.END_HEADERS, 1, stored + b"\xbe" * 2000))
            assert _goaway_code(await p.frames()) == f.COMPRESSION_ERROR
        assert await _echo_once(port) == b"still here"


async def test_the_listeners_connections_together_hold_no_more_than_its_budget_and_let_go_when_closed() -> None:
    # each under its own bound, a thousand peers could hold hundreds of GiB
    conns = Connections(60.0, 4)
    conns.max_held = 300_000
    a, b = (H2Connection(METHODS, conns, MAX_MESSAGE) for _ in range(2))
    ta, tb = _Transport(), _Transport()
    enc_a, enc_b = hpack.Encoder(), hpack.Encoder()
    _fed(a, ta)
    _fed(b, tb)
    partial = (1_000_000).to_bytes(5, "big") + bytes(16_000)  # a message begun, never whole: all held
    for sid in (1, 3, 5, 7, 9, 11, 13, 15):
        a.data_received(_call_frames(enc_a, sid) + f.frame(f.DATA, 0, sid, partial))
    assert not ta.closed and conns.held > 100_000
    for sid in range(1, 41, 2):  # b's bytes would take the listener past its budget: b goes
        b.data_received(_call_frames(enc_b, sid) + f.frame(f.DATA, 0, sid, partial))
        if tb.closed:
            break
    assert tb.closed and f.goaway(sid, f.ENHANCE_YOUR_CALM, b"too many unread bytes") in tb.out and not ta.closed
    b.connection_lost(None)
    a.connection_lost(None)
    assert conns.held == 0
