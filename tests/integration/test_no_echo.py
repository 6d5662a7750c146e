"""A service that does not hear itself (the reconciler) gets every other connection's messages, none of its own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import nats
from nats.aio.msg import Msg

from ops.servers import ServerProcess
from shared.bus.runtime import make_broker, nats_client
from shared.settings import Settings


async def test_a_connection_without_echo_hears_others_but_not_itself(nats_server: ServerProcess) -> None:
    settings = Settings(nats_url=nats_server.url)
    quiet, loud = make_broker(settings, no_echo=True), make_broker(settings)
    await quiet.connect()
    await loud.connect()
    other = await nats.connect(nats_server.url)
    try:
        heard: dict[str, list[bytes]] = {"quiet": [], "loud": []}

        def keep(name: str) -> Callable[[Msg], Awaitable[None]]:
            async def on(msg: Msg) -> None:
                heard[name].append(msg.data)

            return on

        await nats_client(quiet).subscribe("echo.test", cb=keep("quiet"))
        await nats_client(loud).subscribe("echo.test", cb=keep("loud"))
        await nats_client(quiet).flush()
        await nats_client(loud).flush()
        await nats_client(quiet).publish("echo.test", b"from quiet")
        await nats_client(loud).publish("echo.test", b"from loud")
        await other.publish("echo.test", b"from other")
        for nc in (nats_client(quiet), nats_client(loud), other):
            await nc.flush()
        deadline = time.monotonic() + 15  # a count of short sleeps ran out first on a loaded host
        while not (len(heard["quiet"]) >= 2 and len(heard["loud"]) >= 3) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # anything the quiet connection should not get would have arrived by now
        assert sorted(heard["quiet"]) == [b"from loud", b"from other"]
        assert sorted(heard["loud"]) == [b"from loud", b"from other", b"from quiet"]
    finally:
        await other.close()
        await quiet.stop()
        await loud.stop()
