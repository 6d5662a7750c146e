"""Races between the reconciler's consumers and its tick: a commit landing while a scale-down or the tick's resync
works from what it read before, a decision naming another model, an operator's removal racing a commit. The real
reconciler (in process, not started: each handler driven as its pull loop would) on the session's real NATS and
Redis; the concurrent step is injected right after the read it races."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg

from ops.servers import ServerProcess
from services.reconciler.service import Reconciler
from shared.bus import subjects
from shared.bus.messages import (
    DeleteInstance,
    Heartbeat,
    InstanceEvent,
    InstanceEvents,
    ItemOutcome,
    PlacementItem,
    PlacementScored,
    RemoveWorkerCommand,
    decode,
    encode,
)
from shared.bus.runtime import Bus
from shared.core.placement.domain import GIB, Candidate, Decision, Gpu, Instance, InstanceState, ModelSpec, Worker
from shared.core.placement.lifecycle import ACTIVE
from shared.host.isolation import guarded
from shared.settings import Settings
from shared.state import CommitItem
from shared.state.store import ScaleUp
from tests.unit.services.dead_letters import dead_letters

S = InstanceState
W0 = Worker(name="w0", gpus=(Gpu(index=0, vram_total=80 * GIB), Gpu(index=1, vram_total=80 * GIB)),
            ram_total=64 * GIB)
SPEC = ModelSpec(name="m", vram_claim=GIB, weight_bytes=GIB)


def placed(iid: str, gpu: int, model: str = "m") -> Instance:
    return Instance(id=iid, model=model, state=S.SCHEDULED, worker="w0", gpu_indexes=(gpu,), vram_claims=(GIB,))


@pytest.fixture
async def rec(redis_server: ServerProcess, nats_server: ServerProcess) -> AsyncIterator[Reconciler]:
    r = Reconciler(Settings(nats_url=nats_server.url, redis_url=redis_server.url.rsplit("/", 1)[0] + "/11"))
    await r.store.r.flushdb()
    await r.store.register_workers([W0], seen_at=r.clock())
    nc = await nats.connect(nats_server.url)
    r._bus = Bus(nc, r.name)
    yield r
    await nc.close()
    await r.store.close()


async def collected(nc: Any, subject: str) -> list[Msg]:
    got: list[Msg] = []

    async def keep(msg: Msg) -> None:
        got.append(msg)

    await nc.subscribe(subject, cb=keep)
    await nc.flush()
    return got


async def delivered(rec: Reconciler) -> None:
    await rec.bus.nc.flush()
    await asyncio.sleep(0.05)


def instance_events(msgs: list[Msg]) -> list[InstanceEvent]:
    return [e for m in msgs for e in decode(m.data, InstanceEvents).events]


def after(real: Callable[..., Awaitable[Any]], then: Callable[[], Awaitable[None]]) -> Callable[..., Awaitable[Any]]:
    """``real``, then ``then`` before its answer is returned: a concurrent step landing right after the read."""

    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        got = await real(*args, **kwargs)
        await then()
        return got

    return wrapped


async def test_a_scale_down_keeps_a_pending_replica_whose_commit_landed_after_it_read_the_replicas(
    rec: Reconciler,
) -> None:
    (res,) = await rec.store.converge_up([ScaleUp(model="m", replicas=2, spec=SPEC, seq=1, created_at=1.0)], ACTIVE)
    a, x = sorted(i.id for i in res.created)
    assert await rec.store.commit([CommitItem(placed(a, 0))]) == ["ok"]
    await rec.store.set_states([(a, "w0", S.RUNNING)])
    await rec.feed.load(rec.store)
    events = await collected(rec.bus.nc, subjects.EVENT_INSTANCE)

    async def x_commits() -> None:  # the commit consumer places x between the scale-down's read and its removal
        assert await rec.store.commit([CommitItem(placed(x, 1))]) == ["ok"]

    real = rec.store.instances
    rec.store.instances = after(real, x_commits)  # type: ignore[method-assign, assignment]
    await rec.converge("m", scale=ScaleUp(model="m", replicas=1, spec=SPEC, seq=2, created_at=2.0))
    rec.store.instances = real  # type: ignore[method-assign]
    await delivered(rec)
    assert (await rec.store.states([x]))[x] is S.SCHEDULED  # placed, claims and all: not removed behind its back
    assert await rec.store.ledger() == {"w0:0": (GIB, 80 * GIB), "w0:1": (GIB, 80 * GIB)}
    assert not [e for e in instance_events(events) if e.instance.id == x and e.removed]
    # one replica too many now: the next converge drains one of the two placed ones
    await rec.feed.load(rec.store)
    await rec.converge("m")
    states = await rec.store.states([a, x])
    assert sorted(s is S.DRAINING for s in states.values()) == [False, True]


async def test_a_scale_down_announces_and_drains_only_what_it_moved(rec: Reconciler) -> None:
    (res,) = await rec.store.converge_up([ScaleUp(model="m", replicas=2, spec=SPEC, seq=1, created_at=1.0)], ACTIVE)
    a, b = sorted(i.id for i in res.created)
    assert await rec.store.commit([CommitItem(placed(a, 0)), CommitItem(placed(b, 1))]) == ["ok", "ok"]
    await rec.feed.load(rec.store)
    drains = await collected(rec.bus.nc, subjects.worker_drain("w0"))

    async def worker_lost() -> None:  # the tick finds w0 lost meanwhile: its replicas become UNREACHABLE
        await rec.store.release([a, b], mode=S.UNREACHABLE.value)

    real = rec.store.instances
    rec.store.instances = after(real, worker_lost)  # type: ignore[method-assign, assignment]
    await rec.converge("m", scale=ScaleUp(model="m", replicas=0, spec=SPEC, seq=2, created_at=2.0))
    rec.store.instances = real  # type: ignore[method-assign]
    await delivered(rec)
    assert drains == []  # nothing moved to DRAINING (UNREACHABLE is not ACTIVE): no worker told to drain
    assert set((await rec.store.drains()).keys()) == set()


async def test_the_tick_resync_does_not_delete_a_replica_committed_and_reported_during_the_tick(
    rec: Reconciler,
) -> None:
    token = await rec.store.lock_model("m")
    assert token and await rec.store.create_pending("m", token, [Instance(id=i, model="m") for i in ("old", "x", "y")])
    await rec.store.unlock_model("m", token)
    assert await rec.store.commit([CommitItem(placed("old", 0))]) == ["ok"]
    await rec.feed.load(rec.store)
    rec.feed.on_heartbeat(Heartbeat(worker="w0", instances=("old",)), rec.clock())
    deletes = await collected(rec.bus.nc, subjects.worker_delete("w0"))

    async def x_and_y_placed() -> None:  # while the tick awaits Redis: placed, heard, and x already running
        assert await rec.store.commit([CommitItem(placed("x", 1)), CommitItem(placed("y", 1))]) == ["ok", "ok"]
        rec.feed.on_instances([InstanceEvent(instance=placed("x", 1)), InstanceEvent(instance=placed("y", 1))])
        rec.feed.on_heartbeat(Heartbeat(worker="w0", instances=("old", "x")), rec.clock())

    rec.store.restarts = after(rec.store.restarts, x_and_y_placed)  # type: ignore[method-assign, assignment]
    await rec.tick()
    await delivered(rec)
    assert [decode(m.data, DeleteInstance).instance_id for m in deletes] == []


async def test_a_decision_naming_another_model_is_dead_lettered_and_its_replica_placed_again(
    rec: Reconciler,
) -> None:
    (res,) = await rec.store.converge_up([ScaleUp(model="m", replicas=1, spec=SPEC, seq=1, created_at=1.0)], ACTIVE)
    (x,) = (i.id for i in res.created)
    await rec.feed.load(rec.store)
    letters = await dead_letters(rec.bus.nc)
    asked: list[tuple[str, str]] = []

    async def request(asks: Any, now: float) -> None:  # what would go out on the placement stream
        asked.extend((a.instance_id, a.model) for a in asks)

    rec.request = request  # type: ignore[method-assign]
    other = Decision(model="other", candidate=Candidate(worker="w0", gpu_indexes=(0,), vram_claims=(GIB,)),
                     score=1.0, breakdown={})
    scored = PlacementScored(batch_id="b", outcomes=(ItemOutcome(item=PlacementItem(instance_id=x, model="m"),
                                                                  decision=other),))
    await rec.handle_scored([scored])
    await delivered(rec)
    assert (await rec.store.states([x]))[x] is S.PENDING and await rec.store.ledger() == {
        "w0:0": (0, 80 * GIB), "w0:1": (0, 80 * GIB)}
    assert [letter.reason for letter in letters] == [f"a decision for model 'other' on replica {x} of model 'm'"]
    assert asked == [(x, "m")]  # placed again, as its own model


async def test_an_operators_removal_racing_a_commit_is_redelivered_not_dead_lettered(rec: Reconciler) -> None:
    await rec.store.register_workers([W0], seen_at=rec.clock() - 1_000)  # long silent: removable
    await rec.feed.load(rec.store)
    token = await rec.store.lock_model("m")
    assert token and await rec.store.create_pending("m", token, [Instance(id="late", model="m")])
    await rec.store.unlock_model("m", token)
    assert await rec.store.commit([CommitItem(placed("late", 0))]) == ["ok"]  # its event not heard yet
    letters = await dead_letters(rec.bus.nc)
    reply = "$JS.ACK.GANTRY_CMD.scale.1.7.7.1700000000000000000.0"  # as JetStream delivers a command
    acks = await collected(rec.bus.nc, reply)
    data = encode(RemoveWorkerCommand(worker="w0"))
    raw = Msg(rec.bus.nc, subject=subjects.REMOVE_WORKER, data=data, reply=reply)
    assert not await guarded(rec, raw.subject, [raw], functools.partial(rec._remove_worker, data, raw))
    await delivered(rec)
    assert letters == []
    assert [m.data.split(b" ")[0] for m in acks] == [b"-NAK"]  # handed back to the stream: tried again later
    assert await rec.store.worker_names() == {"w0"}



async def test_a_placement_request_that_was_not_stored_leaves_its_replicas_unrequested(rec: Reconciler) -> None:
    async def nats_away(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("nats away")

    rec.bus.publish_js_many = nats_away  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await rec.publish_items([PlacementItem(instance_id="x", model="m")], {"m": SPEC}, 1.0)
    assert "x" not in rec.requested  # asked again as soon as the batch comes back, not three ack waits later
