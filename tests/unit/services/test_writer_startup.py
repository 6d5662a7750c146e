"""A (re)starting reconciler hears worker reports from the moment it subscribes, before its snapshot is loaded from
Redis: the state writer judges them against the loaded snapshot, not the empty one, so a registered worker's reports
are not refused as coming from an unknown worker. The reconciler's real state writer (in process, not started: its
report handlers are handed the messages as their subscriptions would) on the session's real NATS and Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest

from ops.servers import ServerProcess
from services.reconciler.service import Reconciler
from shared.bus import subjects
from shared.bus.messages import GpuUsage, Heartbeat, ModelFileUpdate, encode
from shared.bus.runtime import Bus
from shared.core.placement.domain import GIB, Gpu, ModelFileState, Worker
from shared.settings import Settings
from tests.unit.services.dead_letters import dead_letters

W0 = Worker(name="w0", gpus=(Gpu(index=0, vram_total=80 * GIB),), ram_total=64 * GIB)


@pytest.fixture
async def rec(redis_server: ServerProcess, nats_server: ServerProcess) -> AsyncIterator[Reconciler]:
    r = Reconciler(Settings(nats_url=nats_server.url, redis_url=redis_server.url.rsplit("/", 1)[0] + "/13"))
    await r.store.r.flushdb()
    await r.store.register_workers([W0], seen_at=r.clock())  # registered long before this reconciler started
    nc = await nats.connect(nats_server.url)
    r._bus = Bus(nc, r.name)
    yield r
    await nc.close()
    await r.store.close()


async def test_reports_heard_while_the_snapshot_loads_are_not_refused_as_from_an_unknown_worker(
    rec: Reconciler,
) -> None:
    letters = await dead_letters(rec.bus.nc)
    handlers = {subject: h for subject, queue, h in rec._reports if queue}  # the writer's (a queue group)
    beat = encode(Heartbeat(worker="w0", gpus=(GpuUsage(index=0, vram_used=0),)))
    update = encode(ModelFileUpdate(worker="w0", source="org/m", state=ModelFileState.READY))
    heard = asyncio.gather(
        handlers[subjects.HEARTBEAT](beat, subjects.worker_heartbeat("w0")),
        handlers[subjects.MODEL_FILE](update, subjects.worker_files("w0")),
    )
    await asyncio.sleep(0.05)  # the reports are in before the load
    await rec.feed.load(rec.store)
    rec.ready.set()
    await asyncio.wait_for(heard, 5)
    await rec.bus.nc.flush()
    await asyncio.sleep(0.05)
    assert letters == []
    assert set(rec.writer.beats) == {"w0"} and set(rec.writer.files) == {("org/m", "w0")}
