"""A rejected message stays off the dead letters only when it is exactly a dead letter (``is_dead_letter``: an
``ErrorEvent``'s fields and none other). A worker agent forging another worker's heartbeat with ``service``,
``subject`` and ``reason`` added must still reach the dead-letter stream operators and alerts read. The reconciler's
real state writer (its report handler handed the message as its subscription would) on the session's real NATS and
Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import nats
import pytest

from ops.servers import ServerProcess
from services.reconciler.service import Reconciler
from shared.bus import subjects
from shared.bus.runtime import Bus
from shared.settings import Settings
from tests.unit.services.dead_letters import dead_letters


@pytest.fixture
async def rec(redis_server: ServerProcess, nats_server: ServerProcess) -> AsyncIterator[Reconciler]:
    r = Reconciler(Settings(nats_url=nats_server.url, redis_url=redis_server.url.rsplit("/", 1)[0] + "/13"))
    await r.store.r.flushdb()
    r.ready.set()
    nc = await nats.connect(nats_server.url)
    r._bus = Bus(nc, r.name)
    yield r
    await nc.close()
    await r.store.close()


@pytest.mark.parametrize("disguised", [False, True], ids=["plain", "with-error-event-fields"])
async def test_a_forged_heartbeat_is_dead_lettered_whatever_extra_fields_it_carries(
    rec: Reconciler, disguised: bool
) -> None:
    letters = await dead_letters(rec.bus.nc)
    on_heartbeat = {s: h for s, q, h in rec._reports if q}[subjects.HEARTBEAT]
    forged: dict[str, object] = {"worker": "victim", "gpus": []}  # sent by worker "attacker" as "victim"
    if disguised:
        forged |= {"service": "x", "subject": "y", "reason": "z"}
    await on_heartbeat(msgspec.json.encode(forged), subjects.worker_heartbeat("attacker"))
    await rec.bus.nc.flush()
    await asyncio.sleep(0.1)
    assert len(letters) == 1, "the forged heartbeat is not on the dead letters"
