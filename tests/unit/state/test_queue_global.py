"""Global broker on a real Redis: FastDeploy's global-scheduler scenarios, expiry, fencing, recovery."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from ops.servers import ServerProcess
from shared.core.queueing import ChunkedQuota, ErrorCode, Output, PullBudget, QueuedRequest, SchedulerParams
from shared.state.queue import GlobalBroker

Factory = Callable[..., GlobalBroker]
PARAMS = SchedulerParams(name="global", min_load_score=1, load_shards_num=2, ttl_s=100, sync_period_s=1,
                         expire_period_s=3)
BUDGET = PullBudget(available_blocks=1000, block_size=4, reserved_output_blocks=0, batch=2)


def req(rid: str, prompt: int = 4) -> QueuedRequest:
    return QueuedRequest(request_id=rid, prompt_len=prompt, max_tokens=2, arrival_s=0.0)


@pytest.fixture
async def client(redis_server: ServerProcess) -> AsyncIterator[aioredis.Redis]:
    url = redis_server.url.rsplit("/", 1)[0] + "/4"
    r = aioredis.from_url(url)
    await r.flushdb()
    yield r
    await r.aclose()


@pytest.fixture
def broker(client: aioredis.Redis) -> Factory:
    def make(node: str, params: SchedulerParams = PARAMS, seed: int = 0) -> GlobalBroker:
        return GlobalBroker(client, params, node, rng=random.Random(seed), clock=lambda: 0.0)
    return make


async def test_put_with_a_duplicate_queues_one_and_scores_one(broker: Factory, client: aioredis.Redis) -> None:
    me = broker("me")
    answers = await me.put_requests([req("req-1"), req("req-1")], now=0.0)
    assert answers == [("req-1", None), ("req-1", "duplicated request_id")]
    assert await me.queued() == 1
    assert await client.zscore(me.keys.load("me"), "me") == 1


async def test_an_idle_node_steals_from_a_loaded_peer(broker: Factory, client: aioredis.Redis) -> None:
    me, peer = broker("me"), broker("peer")
    await peer.put_requests([req("stolen"), req("other")], now=0.0)
    got = await me.get_requests(BUDGET, now=1.0)
    assert [r.request_id for r in got] == ["stolen"]
    assert got[0].origin == "peer" and me.stats.stolen == 1
    assert await client.zscore(peer.keys.load("peer"), "peer") == 1
    assert await client.hget(me.keys.lease, "stolen") == b"me"


async def test_no_steal_below_the_min_load_score(broker: Factory) -> None:
    params = SchedulerParams(name="global", min_load_score=3, load_shards_num=2)
    me, peer = broker("me", params), broker("peer", params)
    await peer.put_requests([req("a"), req("b")], now=0.0)
    assert await me.get_requests(BUDGET, now=1.0) == []
    await peer.put_requests([req("c")], now=0.0)
    assert [r.request_id for r in await me.get_requests(BUDGET, now=1.0)] == ["a"]


async def test_own_queue_first_and_no_steal_while_it_has_work(broker: Factory) -> None:
    me, peer = broker("me"), broker("peer")
    await peer.put_requests([req("p1"), req("p2"), req("p3")], now=0.0)
    await me.put_requests([req("m1")], now=0.0)
    assert [r.request_id for r in await me.get_requests(BUDGET, now=1.0)] == ["m1"]


async def test_chunked_quota_takes_short_and_leaves_long_queued(broker: Factory) -> None:
    me = broker("me")
    await me.put_requests([req("short", 2), req("long", 10)], now=0.0)
    quota = ChunkedQuota(long_prefill_token_threshold=4, max_num_partial_prefills=2, max_long_partial_prefills=0)
    budget = PullBudget(available_blocks=100, block_size=4, reserved_output_blocks=0, batch=2, chunked=quota)
    assert [r.request_id for r in await me.get_requests(budget, now=1.0)] == ["short"]
    assert await me.queued_ids() == ["long"]


async def test_results_of_a_stolen_request_go_to_its_origin(broker: Factory) -> None:
    me, peer = broker("me"), broker("peer")
    await peer.put_requests([req("s1"), req("s2")], now=0.0)
    [got] = await me.get_requests(BUDGET, now=1.0)
    assert await me.put_results([Output(request_id=got.request_id, seq=0, num_tokens=1),
                                 Output(request_id=got.request_id, seq=1, num_tokens=1, finished=True)]) == []
    assert me.serving() == 0
    res = await peer.get_results()
    assert [(o.seq, o.finished, o.served_by) for o in res[got.request_id]] == [(0, False, "me"), (1, True, "me")]
    assert await me.get_results() == {}


async def test_64_pending_results_come_back_in_one_call(broker: Factory) -> None:
    me = broker("me")
    await me.put_requests([req(f"r{i}") for i in range(64)], now=0.0)
    big = PullBudget(available_blocks=10_000, block_size=4, reserved_output_blocks=0, batch=64)
    got = await me.get_requests(big, now=1.0)
    await me.put_results([Output(request_id=r.request_id, seq=0, finished=True) for r in got])
    assert len(await me.get_results()) == 64


async def test_an_expired_request_is_answered_at_its_origin_even_when_a_peer_meets_it(broker: Factory) -> None:
    me, peer = broker("me"), broker("peer")
    await peer.put_requests([req("old"), req("old2")], now=0.0)
    assert await me.get_requests(BUDGET, now=100.0) == []
    [answer] = (await peer.get_results())["old"]
    assert answer.finished and answer.error_code == ErrorCode.EXPIRED and answer.served_by == "me"
    assert me.stats.expired == 1


async def test_a_finished_id_cannot_be_queued_again_within_the_ttl(broker: Factory) -> None:
    me = broker("me")
    await me.put_requests([req("x")], now=0.0)
    await me.get_requests(BUDGET, now=0.0)
    await me.put_results([Output(request_id="x", seq=0, finished=True)], now=1.0)
    assert await me.put_requests([req("x")], now=2.0) == [("x", "duplicated request_id")]
    await me.put_requests([req("y")], now=200.0)  # prunes ids finished more than a TTL ago
    assert await me.put_requests([req("x")], now=201.0) == [("x", None)]


async def test_a_retried_chunk_is_delivered_once(broker: Factory) -> None:
    me = broker("me")
    await me.put_requests([req("x")], now=0.0)
    await me.get_requests(BUDGET, now=0.0)
    chunk = Output(request_id="x", seq=0, num_tokens=1)
    await me.put_results([chunk])
    await me.put_results([chunk])
    await me.put_results([Output(request_id="x", seq=1, finished=True)])
    assert await me.put_results([Output(request_id="x", seq=1, finished=True)]) == ["x"]
    assert [o.seq for o in (await me.get_results())["x"]] == [0, 1]


async def test_a_dead_nodes_queued_and_inflight_requests_are_recovered(broker: Factory,
                                                                       client: aioredis.Redis) -> None:
    dead, alive = broker("dead"), broker("alive")
    await dead.heartbeat(0.0)
    await alive.heartbeat(10.0)
    await dead.put_requests([req(f"q{i}") for i in range(5)], now=0.0)
    [flying] = await dead.get_requests(PullBudget(available_blocks=100, block_size=4, batch=1), now=0.0)
    assert await alive.recover_dead(now=2.0) == 0  # heartbeat 2 s old, expiry 3 s: still alive
    assert await alive.recover_dead(now=10.0) == 5
    ids = await alive.queued_ids()
    assert ids == [flying.request_id, "q1", "q2", "q3", "q4"]
    assert await client.zscore(alive.keys.nodes, "dead") is None
    assert await client.zscore(alive.keys.load("dead"), "dead") is None
    assert await client.zscore(alive.keys.load("alive"), "alive") == 5
    # the presumed-dead node's late result is refused; the recovered request is served once, by "alive"
    assert await dead.put_results([Output(request_id=flying.request_id, seq=0, finished=True)]) == [
        flying.request_id]
    got = await alive.get_requests(PullBudget(available_blocks=100, block_size=4, batch=5), now=10.0)
    assert len(got) == 5
    await alive.put_results([Output(request_id=r.request_id, seq=0, finished=True) for r in got], now=10.0)
    res = await dead.get_results()  # the origin's response list holds exactly one answer each
    assert sorted(res) == sorted(f"q{i}" for i in range(5))
    assert all(len(v) == 1 and v[0].served_by == "alive" for v in res.values())


async def test_recovery_moves_bounded_chunks(broker: Factory, client: aioredis.Redis) -> None:
    dead, alive = broker("dead"), broker("alive")
    await dead.heartbeat(0.0)
    await dead.put_requests([req(f"q{i}") for i in range(450)], now=0.0)
    assert await alive.recover_dead(now=10.0) == 450
    assert await client.llen(alive.keys.req("alive")) == 450


async def test_a_restarted_node_gets_its_own_leftover_leases_back(broker: Factory, client: aioredis.Redis) -> None:
    first = broker("n1")
    await first.put_requests([req("a"), req("b")], now=0.0)
    await first.get_requests(BUDGET, now=0.0)
    again = broker("n1")
    assert await again.start(now=5.0) == 2
    assert sorted(await again.queued_ids()) == ["a", "b"]
    got = await again.get_requests(BUDGET, now=5.0)
    assert sorted(r.request_id for r in got) == ["a", "b"]


async def test_concurrent_stealers_never_take_the_same_request(broker: Factory) -> None:
    import asyncio

    owner = broker("owner")
    await owner.put_requests([req(f"r{i}") for i in range(200)], now=0.0)
    thieves = [broker(f"t{i}", seed=i) for i in range(6)]
    one = PullBudget(available_blocks=100, block_size=4, reserved_output_blocks=0, batch=2)

    async def drain(b: GlobalBroker) -> list[str]:
        out: list[str] = []
        for _ in range(200):
            out += [r.request_id for r in await b.get_requests(one, now=1.0)]
        return out

    taken = [rid for ids in await asyncio.gather(*(drain(t) for t in thieves)) for rid in ids]
    assert len(taken) == len(set(taken))
    assert len(taken) + await owner.queued() == 200


@pytest.mark.parametrize("bad", [req(""), req("x", prompt=-3)])
async def test_malformed_requests_are_refused_in_the_answer(broker: Factory, bad: QueuedRequest) -> None:
    [(_, why)] = await broker("me").put_requests([bad], now=0.0)
    assert why is not None and why.startswith("invalid request")


def test_a_node_name_with_spaces_is_refused(client: aioredis.Redis) -> None:
    with pytest.raises(ValueError, match="node name"):
        GlobalBroker(client, PARAMS, "a b")


async def test_a_corrupt_body_or_output_in_redis_never_stops_a_node(broker: Factory, client: aioredis.Redis) -> None:
    me = broker("me")
    await me.put_requests([req("bad"), req("good")], now=0.0)
    await client.hset(me.keys.body, "bad", b"{not json")
    got = await me.get_requests(BUDGET, now=1.0)
    assert [r.request_id for r in got] == ["good"] and await me.queued() == 0
    await client.rpush(me.keys.resp("me"), b"garbage", b'{"request_id": 5}')
    await me.put_results([Output(request_id="good", seq=0, finished=True)])
    assert list(await me.get_results()) == ["good"]


async def test_a_huge_put_is_queued_in_bounded_chunks(broker: Factory) -> None:
    me = broker("me")
    answers = await me.put_requests([req(f"r{i}") for i in range(1200)], now=0.0)
    assert all(why is None for _, why in answers) and await me.queued() == 1200


async def test_a_huge_batch_is_served_in_bounded_pulls(broker: Factory) -> None:
    me = broker("me")
    await me.put_requests([req(f"r{i}") for i in range(700)], now=0.0)
    huge = PullBudget(available_blocks=10**9, block_size=4, reserved_output_blocks=0, batch=10**9)
    first = await me.get_requests(huge, now=1.0)
    assert len(first) == 512 and await me.queued() == 188
    assert await me.put_results([Output(request_id=r.request_id, seq=0, finished=True) for r in first]) == []
    assert len(await me.get_results(limit=1000)) == 512


async def test_a_node_that_dies_before_its_first_heartbeat_is_still_recovered(broker: Factory) -> None:
    ghost, alive = broker("ghost"), broker("alive")
    await ghost.put_requests([req("g1"), req("g2")], now=0.0)
    assert await alive.recover_dead(now=10.0) == 2
    assert await alive.queued_ids() == ["g1", "g2"]


async def test_the_seed_connection_parameters_reach_redis(redis_server: ServerProcess) -> None:
    from urllib.parse import urlparse

    from shared.state.queue import redis_client

    u = urlparse(redis_server.url)
    params = SchedulerParams.from_mapping({"scheduler_name": "global", "scheduler_host": u.hostname or "",
                                           "scheduler_port": u.port or 0, "scheduler_db": 9,
                                           "scheduler_password": u.password or ""})
    r = redis_client(params, username=u.username)
    try:
        b = GlobalBroker(r, params, "solo")
        await r.flushdb()
        assert await b.put_requests([req("a")], now=0.0) == [("a", None)]
        assert await b.queued() == 1
    finally:
        await r.aclose()


# -- found by an adversarial review: bad numbers, a request that never fits, leaks, a second chunk 0 --------------

@pytest.mark.parametrize("bad", [dict(prompt_len=float("nan")), dict(prompt_len=4.5), dict(priority=float("nan")),
                                 dict(priority=0.5), dict(max_tokens=True), dict(arrival_s=float("inf"))])
async def test_a_request_whose_numbers_are_not_integers_is_refused_not_queued_and_lost(
        broker: Factory, bad: dict[str, object]) -> None:
    # stored, it no longer read back: leased, skipped, never answered, its id refused for good
    me = broker("me")
    fields: dict[str, object] = {"request_id": "bad", "prompt_len": 4, "max_tokens": 2, "arrival_s": 0.0, **bad}
    [(rid, why)] = await me.put_requests([QueuedRequest(**fields)], now=0.0)  # type: ignore[arg-type]
    assert rid == "bad" and why is not None and why.startswith("invalid request")
    assert await me.queued() == 0


async def test_a_taken_request_whose_body_does_not_read_lets_go_of_its_lease_and_its_id(
        broker: Factory, client: aioredis.Redis) -> None:
    me = broker("me")
    await me.put_requests([req("corrupt"), req("fine")], now=0.0)
    await client.hset(me.keys.body, "corrupt", b'{"request_id": "corrupt", "prompt_len": null}')  # another version
    got = await me.get_requests(BUDGET, now=1.0)
    assert [r.request_id for r in got] == ["fine"]
    assert await client.hget(me.keys.lease, "corrupt") is None
    assert not await client.sismember(me.keys.inflight("me"), "corrupt")
    await me.start(now=2.0)  # a restart puts back what it was serving: "fine", never the unreadable one
    assert await me.queued_ids() == ["fine"]
    assert await me.put_requests([req("corrupt")], now=3.0) == [("corrupt", None)]  # its id is free again


async def test_a_request_no_engine_of_this_size_can_ever_hold_is_handed_on_not_left_to_block_the_queue(
        broker: Factory) -> None:
    # it sat at the head until its TTL, every request behind it answered 408
    me = broker("me")
    await me.put_requests([req("huge", prompt=10**6), req("ok")], now=0.0)
    small = PullBudget(available_blocks=100, block_size=4, reserved_output_blocks=0, batch=2, total_blocks=100)
    got = await me.get_requests(small, now=1.0)
    assert [r.request_id for r in got] == ["huge"]  # for the engine to refuse (400)
    assert [r.request_id for r in await me.get_requests(small, now=1.0)] == ["ok"]


async def test_the_finished_ids_kept_for_the_ttl_do_not_grow_past_what_the_ttl_holds(
        broker: Factory, client: aioredis.Redis) -> None:
    # trimmed by at most 100 a put, they grew by 400 a round of 500
    params = SchedulerParams(name="global", ttl_s=10, sync_period_s=1, expire_period_s=3)
    me = broker("me", params)
    big = PullBudget(available_blocks=10**6, block_size=4, reserved_output_blocks=0, batch=500)
    for rnd in range(6):
        t = rnd * 100.0
        await me.put_requests([req(f"r{rnd}-{i}") for i in range(500)], now=t)
        got = await me.get_requests(big, now=t)
        await me.put_results([Output(request_id=r.request_id, seq=0, finished=True) for r in got], now=t)
    assert await client.zcard(me.keys.done) <= 500 + 500  # the last round's, and at most one round before it


async def test_a_node_that_takes_before_its_first_heartbeat_is_known_so_its_leases_are_recovered(
        broker: Factory, client: aioredis.Redis) -> None:
    owner, thief = broker("owner"), broker("thief")
    await owner.heartbeat(0.0)
    await owner.put_requests([req("x1"), req("x2")], now=0.0)
    [stolen] = await thief.get_requests(PullBudget(available_blocks=100, block_size=4, batch=1), now=1.0)
    assert await client.zscore(thief.keys.nodes, "thief") is not None
    await owner.heartbeat(20.0)
    assert await owner.recover_dead(now=20.0) >= 1  # the thief died holding it: it comes back
    assert stolen.request_id in await owner.queued_ids()


async def test_a_recovered_request_that_had_begun_its_answer_is_run_again_not_answered_expired(
        broker: Factory) -> None:
    # its acceptance time was past the TTL: "expired" went out as a second chunk 0 after a real one
    dead, alive = broker("dead"), broker("alive")
    await dead.heartbeat(0.0)
    await dead.put_requests([req("long")], now=0.0)
    assert len(await dead.get_requests(BUDGET, now=0.0)) == 1
    assert await dead.put_results([Output(request_id="long", seq=0, num_tokens=1)], now=1.0) == []  # a token
    await alive.heartbeat(150.0)
    assert await alive.recover_dead(now=150.0) == 1  # TTL 100 s: long past it
    assert [r.request_id for r in await alive.get_requests(BUDGET, now=150.0)] == ["long"]  # run again
    chunks = (await dead.get_results())["long"]
    assert [(c.seq, c.error_code) for c in chunks] == [(0, 0)]
