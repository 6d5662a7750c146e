"""Every Gantry process closes its NATS connection within a bound at exit (``shared.host.disconnect``): drained
when the server answers, closed without waiting when it is gone or has stopped answering."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from ops.servers import ServerProcess, start_nats
from shared.host.disconnect import CLOSE_S, DRAIN_S, close_promptly

# nats-py's own drain took 10 s (server killed as it began) and 20 s (server not answering) here.
BOUND_S = DRAIN_S + CLOSE_S + 1.5  # room for a loaded host


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    """A NATS server of the test's own: the test kills or freezes it."""
    srv = start_nats(tmp_path / "nats")
    try:
        yield srv
    finally:
        srv.stop()  # continues it first if the test froze it


async def _connected(srv: ServerProcess) -> Client:
    nc = await nats.connect(srv.url, max_reconnect_attempts=-1)

    async def ignore(_: Msg) -> None:
        pass

    await nc.subscribe("prompt.close.>", cb=ignore)  # a subscription to drain, as every service has
    await nc.flush()
    return nc


async def _timed_close(nc: Client) -> tuple[bool, float]:
    started = time.monotonic()
    drained = await close_promptly(nc)
    return drained, time.monotonic() - started


async def test_a_connection_to_a_live_server_is_drained_and_what_it_published_arrives(server: ServerProcess) -> None:
    listener = await nats.connect(server.url)
    got: list[bytes] = []

    async def take(msg: Msg) -> None:
        got.append(msg.data)

    await listener.subscribe("prompt.close.out", cb=take)
    await listener.flush()
    nc = await _connected(server)
    for i in range(100):
        await nc.publish("prompt.close.out", str(i).encode())  # buffered: the drain must send them
    drained, _ = await _timed_close(nc)
    assert drained and nc.is_closed
    await listener.flush()  # the server has delivered everything it took before this round trip
    await listener.close()
    assert got == [str(i).encode() for i in range(100)]


async def test_a_connection_whose_server_stopped_answering_closes_within_the_bound(server: ServerProcess) -> None:
    nc = await _connected(server)
    server.process.send_signal(signal.SIGSTOP)  # as a vanished host or a partition: no reset ever comes
    drained, took = await _timed_close(nc)
    assert not drained and nc.is_closed
    assert took < BOUND_S


async def test_a_connection_whose_server_died_as_it_closes_closes_within_the_bound(server: ServerProcess) -> None:
    nc = await _connected(server)
    server.process.kill()
    server.process.wait()
    # No await since the kill: the client has not read the reset yet and still takes itself for connected.
    drained, took = await _timed_close(nc)
    assert not drained and nc.is_closed
    assert took < BOUND_S


async def test_a_connection_already_reconnecting_closes_at_once_without_raising(server: ServerProcess) -> None:
    nc = await _connected(server)
    server.process.kill()
    server.process.wait()
    deadline = time.monotonic() + 10
    while not nc.is_reconnecting and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await nc.publish("prompt.close.out", b"pending")  # left pending: nats-py's close raised writing it
    drained, took = await _timed_close(nc)
    assert not drained and nc.is_closed
    assert took < BOUND_S
