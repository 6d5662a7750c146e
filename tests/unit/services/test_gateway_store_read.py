"""The gateway's read of placement's instances is bounded: a state store that accepts and never answers (a
blackholed Redis) gives up after ``read_timeout_s``, and the pool keeps following the instance events."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from services.gateway.service import Gateway, GatewayOptions
from shared.bus.messages import InstanceEvent, InstanceEvents
from shared.core.placement.domain import Instance, InstanceState
from shared.core.routing.pool_source import PoolSource
from shared.state.store import StateStore


async def test_a_state_store_that_never_answers_does_not_hold_the_read_for_long(tmp_path: Path) -> None:
    held: list[asyncio.StreamWriter] = []

    async def silent(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)  # accepted, never answered

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    opts = GatewayOptions(nats_url="nats://127.0.0.1:1", eds_path=tmp_path / "eds.json",
                          pool_source=PoolSource.PLACEMENT, redis_url=f"redis://127.0.0.1:{port}",
                          read_timeout_s=0.3)
    gw = Gateway(opts)
    gw.placed.load([Instance(id="a", model="m", state=InstanceState.RUNNING, worker="w1")])
    store = StateStore.from_url(opts.redis_url or "")
    try:
        start = time.monotonic()
        reading = asyncio.ensure_future(gw.follower.read(store))
        await asyncio.sleep(0.05)
        drained = Instance(id="a", model="m", state=InstanceState.DRAINING, worker="w1")
        gw.placed.apply(InstanceEvents(events=(InstanceEvent(instance=drained, removed=False, at=0.0),)))
        assert gw.placed.placed["a"].state is InstanceState.DRAINING  # not held back behind the read
        with pytest.raises(TimeoutError):
            await reading
        assert time.monotonic() - start < 3.0
        assert gw.placed.placed["a"].state is InstanceState.DRAINING
    finally:
        await store.close()
        for w in held:
            w.close()
        server.close()
