"""A service's snapshot that misses a worker (its announcement was lost) takes the worker's stored inventory when it
hears the worker's heartbeat, instead of asking every worker to register: only the state writer may ask. The filter's
real host (in process, not started: its heartbeat handler is handed the messages as its subscription would) on the
session's real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from ops.servers import ServerProcess
from services.filter.service import FilterService
from shared.bus import subjects
from shared.bus.messages import Heartbeat, WorkerRemovedEvent, encode
from shared.core.placement.domain import GIB, Gpu, GpuUsage, Worker
from shared.settings import Settings

W5 = Worker(name="w5", gpus=(Gpu(index=0, vram_total=80 * GIB), Gpu(index=1, vram_total=80 * GIB)), ram_total=GIB)


@pytest.fixture
async def svc(redis_server: ServerProcess) -> AsyncIterator[FilterService]:
    s = FilterService(Settings(redis_url=redis_server.url.rsplit("/", 1)[0] + "/8"))
    await s.store.r.flushdb()
    yield s
    await s.store.close()


async def heartbeat(svc: FilterService, hb: Heartbeat) -> None:
    """The heartbeat handed to the handler, then the read of the stored inventory it started (beside the feed)."""
    [on_beat] = [h for subject, queue, h in svc._reports if subject == subjects.HEARTBEAT and not queue]
    await on_beat(encode(hb), subjects.worker_heartbeat(hb.worker))
    if (reading := svc._reading.get(hb.worker)) is not None:
        await reading


async def test_a_snapshot_that_missed_a_workers_announcement_takes_its_stored_inventory_at_its_heartbeat(
    svc: FilterService,
) -> None:
    await svc.store.register_workers([W5], 1.0)
    await heartbeat(svc, Heartbeat(worker="w5", seq=1, gpus=(GpuUsage(index=1, vram_used=GIB),)))
    held = svc.feed.worker("w5")
    assert held is not None and [g.vram_used for g in held.gpus] == [0, GIB]  # the inventory, then the heartbeat


async def test_a_worker_not_stored_stays_out_of_the_snapshot(svc: FilterService) -> None:
    await heartbeat(svc, Heartbeat(worker="w5", seq=1))
    assert svc.feed.worker("w5") is None and "w5" not in svc.feed.inventory


async def test_a_stored_inventory_older_than_what_the_snapshot_applied_is_ignored(svc: FilterService) -> None:
    await svc.store.register_workers([W5], 1.0)
    revision, _ = await svc.store.stored_inventory("w5")
    svc.feed.revisions["w5"] = revision + 1  # an announcement the snapshot applied, then lost the worker again
    await heartbeat(svc, Heartbeat(worker="w5", seq=1))
    assert "w5" not in svc.feed.inventory  # an older record never overwrites a newer announcement


async def test_a_worker_removed_while_its_stored_inventory_is_read_stays_out_of_the_snapshot(
    svc: FilterService,
) -> None:
    await svc.store.register_workers([W5], 1.0)  # read as stored: the writer deletes it only after our read
    [on_removed] = [h for subject, queue, h in svc._listens if subject == subjects.EVENT_WORKER_REMOVED]
    began = asyncio.Event()
    read = svc.store.stored_inventory

    async def reading(worker: str) -> tuple[int, Worker | None]:
        began.set()
        return await read(worker)

    svc.store.stored_inventory = reading  # type: ignore[method-assign]
    beat = asyncio.create_task(heartbeat(svc, Heartbeat(worker="w5", seq=1)))
    await began.wait()  # the read of Redis is under way
    await on_removed(encode(WorkerRemovedEvent(worker="w5")))  # the removal, heard while the read is under way
    await beat
    assert "w5" not in svc.feed.inventory and svc.feed.worker("w5") is None  # the stale record does not revive it
