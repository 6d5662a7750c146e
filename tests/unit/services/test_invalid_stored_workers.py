"""A stored worker record that breaks today's limits is left out of every snapshot; the state writer reports it once
on the bus (a dead letter naming the key, the worker and why), counts it, and the operator's removal clears it. The
reconciler's real host and state writer (in process, not started) on the session's real NATS and Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from ops.servers import ServerProcess
from services.reconciler.service import Reconciler
from shared.bus import subjects
from shared.bus.messages import RemoveWorkerCommand, encode
from shared.bus.runtime import Bus
from shared.core.placement.domain import GIB, Gpu, Worker
from shared.host.metrics import INVALID_WORKERS
from shared.settings import Settings
from tests.unit.services.dead_letters import dead_letters

GOOD = Worker(name="w0", gpus=(Gpu(index=0, vram_total=80 * GIB),), ram_total=GIB)
PAST_LIMIT = b'{"name": "w9", "gpus": [{"index": 5000, "vram_total": 1}]}'  # GPU index past MAX_GPU_INDEX


@pytest.fixture
async def rec(redis_server: ServerProcess, nats_server: ServerProcess) -> AsyncIterator[Reconciler]:
    r = Reconciler(Settings(nats_url=nats_server.url, redis_url=redis_server.url.rsplit("/", 1)[0] + "/9"))
    await r.store.r.flushdb()
    await r.store.register_workers([GOOD], 1.0)
    await r.store.r.hset("gantry:workers", "w9", PAST_LIMIT)  # written by an older build, or by hand
    nc = await nats.connect(nats_server.url)
    r._bus = Bus(nc, r.name)
    yield r
    await nc.close()
    await r.store.close()


async def delivered(nc: Client) -> None:
    await nc.flush()  # our own publishes, then a round trip on the subscription's connection
    await asyncio.sleep(0.05)
    await nc.flush()


async def test_an_invalid_stored_record_is_reported_once_with_its_key_and_why_and_the_good_ones_load(
    rec: Reconciler,
) -> None:
    letters = await dead_letters(rec.bus.nc)
    await rec.feed.load(rec.store)
    assert set(rec.feed.inventory) == {"w0"}  # one bad record hides no good one
    for _ in range(3):  # three full checks (and any number of snapshot loads): one report
        assert list(await rec.writer.report_invalid()) == ["w9"]
    await delivered(rec.bus.nc)
    [letter] = letters
    assert letter.subject == "gantry:workers"
    assert letter.reason.startswith("stored record of worker w9 left out of every snapshot: ")
    assert "$.gpus[0].index" in letter.reason and "gantry workers remove w9" in letter.reason
    assert "\n" not in letter.reason
    assert rec.metrics.registry.get_sample_value(INVALID_WORKERS, {"service": "reconciler"}) == 1


async def test_a_repaired_record_is_no_longer_counted_and_reported_again_if_it_breaks_again(rec: Reconciler) -> None:
    letters = await dead_letters(rec.bus.nc)
    await rec.feed.load(rec.store)
    await rec.writer.report_invalid()
    await rec.store.forget_worker("w9", cutoff=None)  # what `gantry workers remove w9` makes the reconciler do
    assert await rec.writer.report_invalid() == {}
    assert rec.metrics.registry.get_sample_value(INVALID_WORKERS, {"service": "reconciler"}) == 0
    await rec.store.r.hset("gantry:workers", "w9", PAST_LIMIT)
    await rec.writer.report_invalid()
    await delivered(rec.bus.nc)
    assert len(letters) == 2


async def test_the_operators_removal_clears_an_invalid_record_and_its_ledger_capacity(rec: Reconciler) -> None:
    letters = await dead_letters(rec.bus.nc)
    await rec.feed.load(rec.store)
    data = encode(RemoveWorkerCommand(worker="w9"))
    # a command as the CLI sends it, delivered here as the command consumer would (its ack goes to the reply subject)
    raw = Msg(rec.bus.nc, subject=subjects.REMOVE_WORKER, data=data, reply="gantry-test.ack.remove")
    await rec._remove_worker(data, raw)
    await delivered(rec.bus.nc)
    assert letters == []
    assert await rec.store.worker_names() == {"w0"}
    assert await rec.store.invalid_workers(["w9"]) == {}
    assert sorted(await rec.store.ledger()) == ["w0:0"]
