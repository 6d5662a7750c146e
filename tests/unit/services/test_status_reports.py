"""Worker status reports about instances the reconciler does not know (removed, never placed, made up) cost one read
for the whole batch, and the genuine reports beside them are still applied. The real reconciler's status handling
(in process, not started: handed the batch as its pull loop would) on the session's real NATS and Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import nats
import pytest

from ops.servers import ServerProcess
from services.reconciler.service import Reconciler
from shared.bus import subjects
from shared.bus.messages import InstanceEvents, InstanceStatus
from shared.bus.runtime import Bus
from shared.core.placement.domain import GIB, Gpu, Instance, InstanceState, Worker
from shared.settings import Settings
from shared.state import CommitItem

W0 = Worker(name="w0", gpus=(Gpu(index=0, vram_total=80 * GIB),), ram_total=64 * GIB)
PLACED = Instance(id="m-1", model="m", state=InstanceState.SCHEDULED, worker="w0", gpu_indexes=(0,),
                  vram_claims=(GIB,))


@pytest.fixture
async def rec(redis_server: ServerProcess, nats_server: ServerProcess) -> AsyncIterator[Reconciler]:
    url = redis_server.url.rsplit("/", 1)[0] + "/6"
    r = Reconciler(Settings(nats_url=nats_server.url, redis_url=url))
    await r.store.r.flushdb()
    await r.store.register_workers([W0], seen_at=r.clock())
    token = await r.store.lock_model("m")
    assert token and await r.store.create_pending("m", token, [Instance(id=PLACED.id, model="m")])
    await r.store.unlock_model("m", token)
    assert await r.store.commit([CommitItem(PLACED)]) == ["ok"]
    await r.feed.load(r.store)
    nc = await nats.connect(nats_server.url)
    r._bus = Bus(nc, r.name)
    yield r
    await nc.close()
    await r.store.close()


async def commands(rec: Reconciler) -> int:
    return int((await rec.store.r.info("stats"))["total_commands_processed"])


@pytest.mark.parametrize("flag", ["deleted", "idle", "error"])
async def test_reports_of_unknown_instances_cost_one_read_and_the_genuine_one_beside_them_is_applied(
    rec: Reconciler, flag: str
) -> None:
    unknown = [
        InstanceStatus(instance_id=f"gone-{n}", worker="w0", state=InstanceState.ERROR if flag == "error"
                       else InstanceState.DRAINING, deleted=flag == "deleted", idle=flag == "idle")
        for n in range(2000)
    ]
    genuine = InstanceStatus(instance_id=PLACED.id, worker="w0", state=InstanceState.ERROR, message="oom")
    before = await commands(rec)
    await rec.handle_status([*unknown, genuine])
    # A read each made three commands a report; the state script's own steps count too (about one per ERROR report).
    assert await commands(rec) - before < len(unknown) + 100
    assert (await rec.store.states([PLACED.id]))[PLACED.id] is InstanceState.ERROR
    assert (await rec.store.failures())[PLACED.id][1] == "oom"


async def test_instances_by_id_reads_those_that_exist_and_skips_an_unreadable_state(rec: Reconciler) -> None:
    await rec.store.r.hset("gantry:inst:state", PLACED.id, "EXPLODED")
    assert await rec.store.instances_by_id([PLACED.id, "nope"]) == {}
    await rec.store.r.hset("gantry:inst:state", PLACED.id, "RUNNING")
    got = await rec.store.instances_by_id([PLACED.id, "nope", PLACED.id])
    assert list(got) == [PLACED.id] and got[PLACED.id].state is InstanceState.RUNNING


async def test_state_changes_of_instances_missing_from_the_feed_are_announced_from_one_read(rec: Reconciler) -> None:
    many = [Instance(id=f"m-{n}", model="m", state=InstanceState.SCHEDULED, worker="w0", gpu_indexes=(0,),
                     vram_claims=(GIB // 2,)) for n in range(2, 42)]
    token = await rec.store.lock_model("m")
    assert token and await rec.store.create_pending("m", token, [Instance(id=i.id, model="m") for i in many])
    await rec.store.unlock_model("m", token)
    assert await rec.store.commit([CommitItem(i) for i in many]) == ["ok"] * len(many)
    rec.feed.instances.clear()  # the feed has not caught up: every record is read from the store
    heard = await rec.bus.nc.subscribe(subjects.EVENT_INSTANCE_PROGRESS)
    before = await commands(rec)
    await rec.handle_status([InstanceStatus(instance_id=i.id, worker="w0", state=InstanceState.STARTING)
                             for i in many])
    # The state script takes about three commands a report; a read each added three more.
    assert await commands(rec) - before < 4 * len(many)
    msg = await heard.next_msg(timeout=2)
    got = msgspec.json.decode(msg.data, type=InstanceEvents).events
    assert [(e.instance.id, e.instance.state) for e in got] == [(i.id, InstanceState.STARTING) for i in many]
