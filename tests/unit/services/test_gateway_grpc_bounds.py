"""The picker's gRPC listener (its own HTTP/2 server, ``services.gateway.h2grpc``) is bounded as its HTTP one, by
the same ``http1.Connections``: a connection with no call open is closed once idle, a long-lived call (Envoy's
access-log stream) keeps its connection, and past the cap a new connection is closed at once while the open ones
keep working."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from services.gateway.h2grpc import H2Connection
from services.gateway.http1 import Connections

# what an HTTP/2 client sends first: the preface and an empty SETTINGS frame (then nothing: an idle connection)
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


async def _echo(requests: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async for msg in requests:
        yield msg


@asynccontextmanager
async def serving(idle_timeout_s: float, max_connections: int) -> AsyncIterator[int]:
    """The picker's gRPC server with its bounds and one echo stream method; yields its port."""
    conns = Connections(idle_timeout_s, max_connections)
    sweeping = asyncio.create_task(conns.sweep_forever())
    server = await asyncio.get_running_loop().create_server(
        lambda: H2Connection({"/t.Echo/Stream": _echo}, conns, 1 << 20), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        sweeping.cancel()
        server.close()


async def _idle_connection(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that sends HTTP/2's preface, then nothing (keep the writer: dropped, it closes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(PREFACE)
    return reader, writer


async def _until_closed(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    """All the server sent until it closed the connection (a slow host gets the whole ``timeout``)."""
    got = b""
    while chunk := await asyncio.wait_for(reader.read(4096), timeout):
        got += chunk
    return got


def _frame_types(data: bytes) -> list[int]:
    """The HTTP/2 frame types in ``data`` (each frame: 3 bytes of length, its type, flags, 4 of stream id)."""
    types, at = [], 0
    while at + 9 <= len(data):
        types.append(data[at + 3])
        at += 9 + int.from_bytes(data[at:at + 3], "big")
    return types


GOAWAY = 0x7


async def test_a_grpc_connection_with_no_call_is_closed_once_idle_and_a_long_lived_stream_is_not() -> None:
    async with serving(idle_timeout_s=0.3, max_connections=8) as port, \
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = channel.stream_stream("/t.Echo/Stream")()
        await stream.write(b"first")
        assert await stream.read() == b"first"
        idle, _kept = await _idle_connection(port)  # quiet from now on, as the stream is
        assert GOAWAY in _frame_types(await _until_closed(idle))  # told to go away, then closed
        await stream.write(b"later")  # the stream's connection, as quiet as long, is still open
        assert await stream.read() == b"later"
        await stream.done_writing()


async def test_past_the_cap_a_new_grpc_connection_is_closed_at_once_and_the_open_call_keeps_working() -> None:
    async with serving(idle_timeout_s=60.0, max_connections=2) as port, \
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = channel.stream_stream("/t.Echo/Stream")()
        await stream.write(b"a")
        assert await stream.read() == b"a"
        _second = await _idle_connection(port)  # the cap is reached
        refused, _ = await _idle_connection(port)
        assert await _until_closed(refused) == b""  # closed before a byte of HTTP/2
        await stream.write(b"b")
        assert await stream.read() == b"b"
        await stream.done_writing()
