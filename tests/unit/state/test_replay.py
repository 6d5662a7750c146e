"""Every Lua script run twice for one call, as a client that lost the first run's reply sends it again: the state
after the second run is the state after the first, and the caller gets an answer meaning what the first meant.

``Twice`` runs each call of one real script on the real Redis twice in a row (the relay test in test_lean drops a
real reply; this does the same deterministically for every script), keeping what the database held after each
run, and hands the caller the second reply."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
import redis.asyncio as aioredis

from ops.servers import ServerProcess
from shared.core.placement.domain import GIB, Gpu, Instance, InstanceState, ModelSpec, Worker
from shared.core.placement.lifecycle import ACTIVE
from shared.core.queueing import Output, PullBudget, QueuedRequest, SchedulerParams
from shared.state import CommitItem, StateStore
from shared.state import queue as queue_module
from shared.state.queue import GlobalBroker
from shared.state.store import ScaleUp

Snapshot = dict[bytes, Any]


async def snapshot(r: aioredis.Redis) -> Snapshot:
    """Every key of the database with its value."""
    out: Snapshot = {}
    async for key in r.scan_iter(count=1000):
        kind = (await r.type(key)).decode()
        if kind == "string":
            out[key] = await r.get(key)
        elif kind == "hash":
            out[key] = await r.hgetall(key)
        elif kind == "set":
            out[key] = await r.smembers(key)
        elif kind == "list":
            out[key] = await r.lrange(key, 0, -1)
        elif kind == "zset":
            out[key] = await r.zrange(key, 0, -1, withscores=True)
        else:
            raise AssertionError(f"unexpected type {kind} of {key!r}")
    return out


class Twice:
    """A script whose every call runs twice (optionally with ``between`` run in between): the caller gets the
    second reply; ``runs`` keeps (first reply, second reply, state after the first, state after the second)."""

    def __init__(self, script: Any, r: aioredis.Redis, between: Callable[[], Awaitable[None]] | None = None) -> None:
        self.script, self.r, self.between = script, r, between
        self.runs: list[tuple[Any, Any, Snapshot, Snapshot]] = []

    async def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        first = await self.script(keys=keys, args=args)
        after_first = await snapshot(self.r)
        if self.between is not None:
            await self.between()
            after_first = await snapshot(self.r)
        second = await self.script(keys=keys, args=args)
        self.runs.append((first, second, after_first, await snapshot(self.r)))
        return second

    def assert_harmless(self) -> None:
        """Each call's second run left the state as the first left it."""
        assert self.runs, "the script was never called"
        for _, _, after_first, after_second in self.runs:
            assert after_second == after_first

    def assert_same_replies(self) -> None:
        """Each call's second run answered what the first answered."""
        for first, second, _, _ in self.runs:
            assert second == first


def twice(owner: Any, attr: str, r: aioredis.Redis, between: Callable[[], Awaitable[None]] | None = None) -> Twice:
    wrapped = Twice(getattr(owner, attr), r, between)
    setattr(owner, attr, wrapped)
    return wrapped


SPEC = ModelSpec(name="m", weight_bytes=2 * GIB)
W1 = Worker(name="w1", gpus=(Gpu(index=0, vram_total=80 * GIB),), ram_total=64 * GIB)


def placed(iid: str) -> CommitItem:
    return CommitItem(Instance(id=iid, model="m", state=InstanceState.SCHEDULED, worker="w1", gpu_indexes=(0,),
                               vram_claims=(GIB,)))


async def pending(store: StateStore, *ids: str) -> None:
    token = await store.lock_model("m")
    assert token
    assert await store.create_pending("m", token, [Instance(id=i, model="m") for i in ids])
    await store.unlock_model("m", token)


# -- the state store's scripts (the lean connection retries them) ------------------------------------------------

async def test_a_replayed_commit_answers_ok_and_claims_once(store: StateStore) -> None:
    await store.register_workers([W1])
    await pending(store, "a")
    runs = twice(store, "_commit", store.r)
    assert await store.commit([placed("a")]) == ["ok"]
    runs.assert_harmless()
    runs.assert_same_replies()
    assert await store.ledger() == {"w1:0": (GIB, 80 * GIB)}


async def test_a_replayed_converge_up_reports_the_replicas_it_created_as_created(store: StateStore) -> None:
    runs = twice(store, "_converge_up", store.r)
    (res,) = await store.converge_up([ScaleUp(model="m", replicas=2, spec=SPEC, seq=1)], ACTIVE)
    runs.assert_harmless()
    runs.assert_same_replies()
    assert res.status == "ok" and res.applied and len(res.created) == 2 and res.unrequested == ()


async def test_a_replayed_create_pending_creates_once(store: StateStore) -> None:
    token = await store.lock_model("m")
    assert token
    runs = twice(store, "_create", store.r)
    assert await store.create_pending("m", token, [Instance(id="a", model="m"), Instance(id="b", model="m")])
    runs.assert_harmless()
    runs.assert_same_replies()


async def test_a_replica_placed_before_the_replay_of_its_creation_stays_placed(store: StateStore) -> None:
    await store.register_workers([W1])
    token = await store.lock_model("m")
    assert token

    async def placed_meanwhile() -> None:  # another reconciler saw it PENDING and placed it
        assert await store.commit([placed("a")]) == ["ok"]

    twice(store, "_create", store.r, placed_meanwhile)
    assert await store.create_pending("m", token, [Instance(id="a", model="m")])
    assert await store.states(["a"]) == {"a": InstanceState.SCHEDULED}
    assert await store.claims_consistent() == []


async def test_a_replayed_creation_after_the_lock_expired_still_says_it_created(store: StateStore) -> None:
    token = await store.lock_model("m")
    assert token

    async def lock_expired() -> None:
        await store.r.delete("gantry:lock:m")

    twice(store, "_create", store.r, lock_expired)
    assert await store.create_pending("m", token, [Instance(id="a", model="m")])  # it did create the replica


async def test_a_replayed_forget_worker_answers_ok_and_changes_nothing_more(store: StateStore) -> None:
    await store.register_workers([W1], seen_at=1.0)
    runs = twice(store, "_forget_worker", store.r)
    assert await store.forget_worker("w1", cutoff=5.0) == "ok"
    runs.assert_harmless()
    runs.assert_same_replies()


async def test_a_replayed_mark_state_answers_the_ids_it_moved(store: StateStore) -> None:
    await store.register_workers([W1])
    await pending(store, "a")
    assert await store.commit([placed("a")]) == ["ok"]
    token = await store.lock_model("m")
    assert token
    runs = twice(store, "_mark", store.r)
    assert await store.mark_state("m", token, InstanceState.DRAINING, ACTIVE, ["a"]) == ["a"]
    runs.assert_harmless()
    runs.assert_same_replies()


async def test_a_replayed_scale_down_removal_answers_the_replicas_it_removed(store: StateStore) -> None:
    await pending(store, "a", "b")
    runs = twice(store, "_release", store.r)
    assert await store.remove_pending(["a", "b"]) == ["a", "b"]
    runs.assert_harmless()
    runs.assert_same_replies()


async def test_a_replayed_release_frees_the_claims_once(store: StateStore) -> None:
    await store.register_workers([W1])
    await pending(store, "a", "b")
    assert await store.commit([placed("a"), placed("b")]) == ["ok", "ok"]
    runs = twice(store, "_release", store.r)
    await store.release(["a"])
    await store.release(["b"], mode=InstanceState.UNREACHABLE.value)
    runs.assert_harmless()  # its count (0 the second time) is read by no caller
    assert await store.ledger() == {"w1:0": (0, 80 * GIB)}
    assert await store.states(["a", "b"]) == {"b": InstanceState.UNREACHABLE}


async def test_a_replayed_status_report_answers_the_state_it_moved_from(store: StateStore) -> None:
    await store.register_workers([W1])
    await pending(store, "a")
    assert await store.commit([placed("a")]) == ["ok"]
    runs = twice(store, "_set_state", store.r)
    assert await store.set_states([("a", "w1", InstanceState.STARTING)]) == [InstanceState.SCHEDULED]
    runs.assert_harmless()
    runs.assert_same_replies()


async def test_a_replayed_registration_answers_its_revision_not_stale(store: StateStore) -> None:
    runs = twice(store, "_register", store.r)
    first = await store.register_workers([W1], seen_at=1.0, expected={"w1": None})
    assert first["w1"].isdigit()
    changed = Worker(name="w1", gpus=(Gpu(index=0, vram_total=40 * GIB),), ram_total=64 * GIB)
    stored = await store.r.hget("gantry:workers", "w1")
    again = await store.register_workers([changed], seen_at=2.0, expected={"w1": stored})
    assert again["w1"].isdigit() and int(again["w1"]) > int(first["w1"])
    await store.register_workers([W1], seen_at=3.0)  # any stored record ("*"): the revision moves once
    runs.assert_harmless()
    runs.assert_same_replies()


async def test_a_replayed_unlock_leaves_the_lock_released(store: StateStore) -> None:
    token = await store.lock_model("m")
    assert token
    runs = twice(store, "_unlock", store.r)
    await store.unlock_model("m", token)
    runs.assert_harmless()  # its answer (0 the second time) is read by no caller
    assert await store.lock_model("m") is not None


# -- the global broker's scripts (redis-py retries them) ---------------------------------------------------------

PARAMS = SchedulerParams(name="global", min_load_score=1, load_shards_num=2, ttl_s=100, sync_period_s=1,
                         expire_period_s=3)
BUDGET = PullBudget(available_blocks=1000, block_size=4, reserved_output_blocks=0, batch=2)


def req(rid: str) -> QueuedRequest:
    return QueuedRequest(request_id=rid, prompt_len=4, max_tokens=2, arrival_s=0.0)


@pytest.fixture
async def client(redis_server: ServerProcess) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.from_url(redis_server.url.rsplit("/", 1)[0] + "/4")
    await r.flushdb()
    yield r
    await r.aclose()


def node(client: aioredis.Redis, name: str) -> GlobalBroker:
    return GlobalBroker(client, PARAMS, name, rng=random.Random(0), clock=lambda: 0.0)


async def test_a_replayed_put_queues_once_and_answers_queued_not_duplicate(client: aioredis.Redis) -> None:
    me = node(client, "me")
    runs = twice(me, "_put", client)
    assert await me.put_requests([req("a"), req("b")], now=0.0) == [("a", None), ("b", None)]
    runs.assert_harmless()
    runs.assert_same_replies()
    assert await me.queued_ids() == ["a", "b"]


async def test_a_replayed_take_hands_over_the_requests_it_leased(client: aioredis.Redis) -> None:
    me = node(client, "me")
    await me.put_requests([req("a"), req("b"), req("c")], now=0.0)
    runs = twice(me, "_take", client)
    got = await me.get_requests(BUDGET, now=0.0)
    assert [r.request_id for r in got] == ["a", "b"]  # leased to this node: served by it, not left stuck
    runs.assert_harmless()
    runs.assert_same_replies()
    assert await me.queued_ids() == ["c"]


async def test_a_replayed_final_chunk_is_delivered_once_and_not_refused(client: aioredis.Redis) -> None:
    me = node(client, "me")
    await me.put_requests([req("a")], now=0.0)
    await me.get_requests(BUDGET, now=0.0)
    runs = twice(me, "_deliver", client)
    chunks = [Output(request_id="a", seq=0, num_tokens=1), Output(request_id="a", seq=1, finished=True)]
    assert await me.put_results(chunks) == []
    runs.assert_harmless()
    runs.assert_same_replies()
    assert list(me.stats.served_ids) == ["a"] and me.stats.refused_results == 0
    assert [o.seq for o in (await me.get_results())["a"]] == [0, 1]


async def test_a_replayed_recovery_moves_each_chunk_once_and_counts_it(
    client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(queue_module, "RECOVER_CHUNK", 2)
    dead, alive = node(client, "dead"), node(client, "alive")
    await dead.heartbeat(0.0)
    await dead.put_requests([req(f"q{i}") for i in range(5)], now=0.0)
    runs = twice(alive, "_recover", client)
    assert await alive.recover_dead(now=10.0) == 5
    runs.assert_harmless()
    runs.assert_same_replies()
    assert await alive.queued_ids() == [f"q{i}" for i in range(5)]
