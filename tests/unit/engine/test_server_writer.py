"""The socket writer: a slow reader keeps its bytes in its own backlog, others go on; a gone peer marks the
connection dead; a stream's last bytes resolve ``flushed`` only once they are all out."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from services.engine_server import writer as writer_mod
from services.engine_server.sse import SseSink
from services.engine_server.writer import INLINE_MAX, SocketWriter


def _pair(bufsize: int = 4096) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
    a.setblocking(False)
    return a, b


def _drain(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


async def test_a_slow_reader_keeps_a_backlog_and_gets_everything_in_order_once_it_reads() -> None:
    writer = SocketWriter()
    slow_srv, slow_cli = _pair()
    fast_srv, fast_cli = _pair(1 << 20)
    slow, fast = writer.open(slow_srv.fileno()), writer.open(fast_srv.fileno())
    try:
        payload = [bytes([65 + i % 26]) * 1000 for i in range(200)]  # far more than the socket buffers hold
        for i, p in enumerate(payload):
            writer.pending.append((slow, p, i == len(payload) - 1))
            writer.pending.append((fast, b"x", False))
            writer.flush()
        await asyncio.sleep(0.05)
        got_fast = _drain(fast_cli)
        assert got_fast == b"x" * 200  # the slow reader held nobody up
        assert not slow.flushed.done()  # its last bytes are still waiting
        got = b""
        for _ in range(400):
            got += _drain(slow_cli)
            if slow.flushed.done():
                break
            await asyncio.sleep(0.01)
        got += _drain(slow_cli)
        assert slow.flushed.done() and got == b"".join(payload)
    finally:
        writer.close()
        for s in (slow_srv, slow_cli, fast_srv, fast_cli):
            s.close()


@pytest.mark.parametrize("burst", [False, True])
async def test_a_peer_that_is_gone_marks_the_connection_dead(burst: bool) -> None:
    writer = SocketWriter()
    srv, cli = _pair()
    other_srv, other_cli = _pair()
    conn, other = writer.open(srv.fileno()), writer.open(other_srv.fileno())
    cli.close()
    try:
        for _ in range(3):
            if burst:  # between two healthy writes of the same burst
                writer.fast.extend([(other.fd, b"a", other), (conn.fd, b"data", conn), (other.fd, b"b", other)])
            else:
                writer.pending.append((conn, b"data", False))
            writer.flush()
            await asyncio.sleep(0.01)
        assert conn.dead
        writer.pending.append((conn, b"end", True))
        writer.flush()
        await asyncio.wait_for(conn.flushed, 2)
        assert not other.dead and _drain(other_cli) == (b"ab" * 3 if burst else b"")
    finally:
        writer.close()
        for s in (srv, other_srv, other_cli):
            s.close()


async def test_big_steps_go_through_the_thread_small_ones_inline_with_the_same_bytes() -> None:
    writer = SocketWriter()
    pairs = [_pair(1 << 16) for _ in range(INLINE_MAX + 8)]
    conns = [writer.open(s.fileno()) for s, _ in pairs]
    try:
        for k in (1, INLINE_MAX + 8):  # a small step, then a big one
            for c in conns[:k]:
                writer.pending.append((c, b"t%d;" % k, False))
            writer.flush()
        for c in conns:
            writer.pending.append((c, b"end", True))
        writer.flush()
        await asyncio.wait_for(asyncio.gather(*(c.flushed for c in conns)), 5)
        got = [_drain(cli) for _, cli in pairs]
        expect = b"t%d;" % (INLINE_MAX + 8)
        assert got[0] == b"t1;" + expect + b"end"
        assert all(g == expect + b"end" for g in got[1:])
    finally:
        writer.close()
        for srv, cli in pairs:
            srv.close()
            cli.close()


async def test_a_burst_of_small_steps_reaches_a_slow_reader_whole_and_in_order_behind_its_backlog() -> None:
    writer = SocketWriter()
    slow_srv, slow_cli = _pair()
    fast_srv, fast_cli = _pair(1 << 20)
    slow_sink = SseSink("a", "m", 0, False, False, lambda t: b'"%d"' % t, eos=-1)
    fast_sink = SseSink("b", "m", 0, False, False, lambda t: b'"%d"' % t, eos=-1)
    slow_sink.attach_writer(writer.open(slow_srv.fileno()), writer)
    fast_sink.attach_writer(writer.open(fast_srv.fileno()), writer)
    try:
        for step in range(300):  # the slow socket fills up after a few dozen chunks: its rest is the thread's
            assert slow_sink.token(step) and fast_sink.token(step)
            writer.flush()
        got_fast, got = b"", b""
        for _ in range(400):
            got_fast += _drain(fast_cli)
            got += _drain(slow_cli)
            if got.count(b"data: ") == got_fast.count(b"data: ") == 300:
                break
            await asyncio.sleep(0.01)
        assert got_fast.count(b"data: ") == 300 and got_fast.index(b'"0"') < got_fast.index(b'"299"')
        texts = [int(line.split(b'"text":"')[1].split(b'"')[0]) for line in got.split(b"\r\n") if b"data: " in line]
        assert texts == list(range(300))  # every chunk, in order, although most went through the backlog
    finally:
        writer.close()
        for s in (slow_srv, slow_cli, fast_srv, fast_cli):
            s.close()


async def test_a_small_step_does_not_overtake_a_big_one_the_thread_has_not_sent() -> None:
    writer = SocketWriter()
    srv, cli = _pair(1 << 20)
    conn = writer.open(srv.fileno())
    try:
        with writer._lock:  # the thread is busy: the big step stays queued
            writer.pending.extend((conn, b"big%d;" % i, False) for i in range(INLINE_MAX + 1))
            writer.flush()
        writer.fast.append((conn.fd, b"small;", conn))  # the lock is free now, but the big batch may not be out yet
        writer.flush()
        got = b""
        for _ in range(100):
            await asyncio.sleep(0.01)
            got += _drain(cli)
            if got.endswith(b"small;"):
                break
        assert got == b"".join(b"big%d;" % i for i in range(INLINE_MAX + 1)) + b"small;"
    finally:
        writer.close()
        srv.close()
        cli.close()


async def test_a_sink_with_a_shared_table_streams_the_same_bytes_as_one_without() -> None:
    pieces = {7: b'" seven"', 8: b'" eight"', 999: b'" long word here"'}
    def piece(t: int) -> bytes:
        return pieces.get(t, b'"?%d"' % t)
    writer = SocketWriter()
    pairs = [_pair(1 << 20) for _ in range(2)]
    table = {7: pieces[7], 999: pieces[999], 5: b'"eos text"'}  # 8 is outside the table; 5 is EOS
    sinks = [SseSink("cmpl-x", "m", 3, False, True, piece, eos=5, table=table),
             SseSink("cmpl-x", "m", 3, False, True, piece, eos=5)]
    for sink, (srv, _) in zip(sinks, pairs, strict=True):
        sink.attach_writer(writer.open(srv.fileno()), writer)
    try:
        for tok in (7, 8, 999, 123, 5):
            assert all(s.token(tok) for s in sinks)
            writer.flush()
        got = [_drain(cli) for _, cli in pairs]
        assert got[0] == got[1] and got[0].count(b"data: ") == 4 and b"eos text" not in got[0]
        assert sinks[0].produced == sinks[1].produced == 4
    finally:
        writer.close()
        for srv, cli in pairs:
            srv.close()
            cli.close()


async def test_a_peer_that_stops_reading_costs_linear_time_and_is_given_up_past_the_backlog_bound() -> None:
    # the backlog was joined anew at every chunk: quadratic CPU (9 s of the writer for 40,000 tokens), GIL held
    writer = SocketWriter()
    srv, cli = _pair()
    conn = writer.open(srv.fileno())
    try:
        chunk = b"x" * 512
        cpu = time.thread_time()
        sent = 0
        with writer._lock:
            while not conn.dead:
                conn.send(chunk)
                sent += len(chunk)
        cpu = time.thread_time() - cpu
        assert sent <= writer_mod.MAX_BACKLOG_BYTES + (1 << 20) and not conn.backlog
        assert cpu < 1.0, cpu  # ~16,000 chunks into a socket nobody reads
    finally:
        writer.close()
        srv.close()
        cli.close()


async def test_a_peer_alive_but_reading_nothing_is_given_up_after_the_stall_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # its connection (and handler) was held after its request ended, for as long as the client kept it open
    monkeypatch.setattr(writer_mod, "STALL_S", 0.3)
    writer = SocketWriter()
    srv, cli = _pair()
    conn = writer.open(srv.fileno())
    try:
        for i in range(64):  # far more than the socket buffers hold, far less than the backlog bound
            writer.pending.append((conn, b"y" * 4096, i == 63))
            writer.flush()
        await asyncio.wait_for(conn.flushed, 5)  # released once the stall time passed
        assert conn.dead and not conn.backlog
    finally:
        writer.close()
        srv.close()
        cli.close()


class _Closing:
    """The client's transport, already closing when the response headers go out."""

    def is_closing(self) -> bool:
        return True

    def get_extra_info(self, name: str) -> object:
        return None


@pytest.mark.parametrize("transport", [_Closing(), None], ids=["transport closing", "ASGI only"])
async def test_a_stream_whose_client_left_before_the_headers_is_closed_not_run_to_its_end(transport: object) -> None:
    # it streamed into nothing for its whole length (20,000 tokens), its KV blocks and batch slot held
    from services.engine_server.sse import TRANSPORT_KEY, SseResponse

    closed: list[bool] = []
    sink = SseSink("a", "m", 0, False, False, lambda t: b'"%d"' % t, eos=-1)
    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    async def receive() -> dict[str, object]:
        return {"type": "http.disconnect"}

    scope = {"type": "http", "http_version": "1.1", "extensions": {TRANSPORT_KEY: transport} if transport else {}}
    await asyncio.wait_for(SseResponse(sink, lambda: closed.append(True))(scope, receive, send), 2)  # type: ignore[arg-type]
    assert closed == [True] and not sink.done.done()  # on_close aborts the request; it never finished
    assert [m["type"] for m in sent] == ["http.response.start"]
