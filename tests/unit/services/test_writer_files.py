"""What one worker's reports can make the state writer hold is bounded: files of at most MAX_FILES_PER_WORKER model
sources are stored (the rest dead-lettered with why; updates of those it holds still go through), and at most
SUPERSEDED_MAX replaced registrations wait to be judged, even while nothing is flushed. The reconciler's real state
writer (in process, not started: its report handler is handed the messages as its subscription would) on the session's
real NATS and Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from ops.servers import ServerProcess, free_port
from services.reconciler.service import Reconciler
from services.reconciler.writer import SUPERSEDED_MAX
from shared.bus import subjects
from shared.bus.messages import ModelFileUpdate, WorkerRegistration, encode
from shared.bus.runtime import Bus
from shared.core.limits import MAX_FILES_PER_WORKER
from shared.core.placement.domain import GIB, Gpu, ModelFileState, Worker
from shared.settings import Settings
from shared.state import StateStore
from tests.unit.services.dead_letters import dead_letters

W0 = Worker(name="w0", gpus=(Gpu(index=0, vram_total=80 * GIB),), ram_total=64 * GIB)


@pytest.fixture
async def rec(redis_server: ServerProcess, nats_server: ServerProcess) -> AsyncIterator[Reconciler]:
    url = redis_server.url.rsplit("/", 1)[0] + "/7"
    r = Reconciler(Settings(nats_url=nats_server.url, redis_url=url))
    await r.store.r.flushdb()
    r.feed.inventory["w0"] = W0
    r.ready.set()  # its snapshot loaded: the writer judges reports against it
    nc = await nats.connect(nats_server.url)
    r._bus = Bus(nc, r.name)
    yield r
    await nc.close()
    await r.store.close()


async def file_report(rec: Reconciler, source: str, state: ModelFileState = ModelFileState.READY) -> None:
    [on_file] = [h for subject, _, h in rec._reports if subject == subjects.MODEL_FILE]
    await on_file(encode(ModelFileUpdate(worker="w0", source=source, state=state)), subjects.worker_files("w0"))


async def test_files_of_more_sources_than_the_limit_are_dead_lettered_and_known_ones_still_stored(
    rec: Reconciler,
) -> None:
    letters = await dead_letters(rec.bus.nc)
    for n in range(MAX_FILES_PER_WORKER + 5):
        await file_report(rec, f"org/model-{n}")
    await file_report(rec, "org/model-0", ModelFileState.ERROR)
    await rec.writer.flush()
    await rec.bus.nc.flush()
    await asyncio.sleep(0.05)
    stored = {f.source: f.state for f in await rec.store.model_files()}
    assert len(stored) == MAX_FILES_PER_WORKER and stored["org/model-0"] is ModelFileState.ERROR
    assert len(letters) == 5
    assert letters[0].reason == f"model file: worker w0 reports files of more than {MAX_FILES_PER_WORKER} model sources"


async def registration(rec: Reconciler, gpus: int) -> None:
    [on_register] = [h for subject, _, h in rec._reports if subject == subjects.REGISTER]
    worker = Worker(name="w0", gpus=tuple(Gpu(index=i, vram_total=80 * GIB) for i in range(gpus)), ram_total=GIB)
    await on_register(encode(WorkerRegistration(worker=worker)), subjects.worker_register("w0"))


async def test_registrations_replaced_while_nothing_is_flushed_are_held_only_up_to_a_bound(rec: Reconciler) -> None:
    for n in range(SUPERSEDED_MAX + 50):  # a worker changing its inventory on every message, Redis away
        await registration(rec, 1 + n % 2)
    assert len(rec.writer.superseded) == SUPERSEDED_MAX
    live, rec.store = rec.store, StateStore.from_url(f"redis://127.0.0.1:{free_port()}/0")  # Redis away
    with pytest.raises(RedisConnectionError):  # the flush fails: what it held is kept for the next one, still bounded
        await rec.writer.flush()
    await rec.store.close()
    rec.store = live
    await registration(rec, 1)
    await registration(rec, 2)
    assert len(rec.writer.superseded) == SUPERSEDED_MAX
