"""Splitwise broker on a real Redis: FastDeploy's splitwise scenarios plus expiry and load accounting."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import msgspec
import pytest
import redis.asyncio as aioredis

from ops.servers import ServerProcess
from shared.core.queueing import (
    ChunkedQuota,
    ErrorCode,
    NodeInfo,
    Output,
    PullBudget,
    QueuedRequest,
    SchedulerParams,
    SplitRequest,
)
from shared.core.roles import NodeRole
from shared.state.splitwise import NO_NODES, SplitwiseFront, SplitwiseNode

PARAMS = SchedulerParams(name="splitwise", topic="fd", ttl_s=100, sync_period_s=1, expire_period_s=3)
BUDGET = PullBudget(available_blocks=1000, block_size=4, reserved_output_blocks=0, batch=4)


def req(rid: str, prompt: int = 50) -> QueuedRequest:
    return QueuedRequest(request_id=rid, prompt_len=prompt, max_tokens=4, arrival_s=0.0)


@pytest.fixture
async def client(redis_server: ServerProcess) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.from_url(redis_server.url.rsplit("/", 1)[0] + "/6")
    await r.flushdb()
    yield r
    await r.aclose()


def node(client: aioredis.Redis, name: str, role: NodeRole, **kw: object) -> SplitwiseNode:
    return SplitwiseNode(client, PARAMS, name, role, clock=lambda: 0.0, **kw)  # type: ignore[arg-type]


async def test_sync_cluster_keeps_fresh_nodes_and_drops_expired_or_unknown_roles(client: aioredis.Redis) -> None:
    await node(client, "p", NodeRole.PREFILL).report(now=10.0)
    await node(client, "d", NodeRole.DECODE).report(now=9.0)
    await node(client, "old", NodeRole.DECODE).report(now=1.0)
    await client.hset("gantry:sw:{fd}:cluster", "weird", b'{"node":"weird","role":"oracle","ts":10.0}')
    await client.hset("gantry:sw:{fd}:cluster", "junk", b"not json")
    front = SplitwiseFront(client, PARAMS, "api")
    assert [n.node for n in await front.sync_cluster(now=10.0)] == ["d", "p"]


async def test_a_mixed_node_gets_one_queue_entry_without_a_decode_node(client: aioredis.Redis) -> None:
    m = node(client, "m", NodeRole.MIXED)
    await m.report(now=0.0)
    front = SplitwiseFront(client, PARAMS, "api", rng=random.Random(0))
    await front.sync_cluster(now=0.0)
    assert await front.put_requests([req("r1")], now=0.0) == [("r1", None)]
    [item] = await client.lrange("gantry:sw:{fd}:req:m", 0, -1)
    sr = msgspec.json.decode(item, type=SplitRequest)
    assert (sr.prefill, sr.decode, sr.front, sr.request.origin) == ("m", None, "api", "api")


async def test_p_and_d_on_different_hosts_get_rdma_and_both_queues(client: aioredis.Redis) -> None:
    await node(client, "p", NodeRole.PREFILL, host="host-a").report(now=0.0)
    await node(client, "d", NodeRole.DECODE, host="host-b", protocols=("ipc", "rdma")).report(now=0.0)
    front = SplitwiseFront(client, PARAMS, "api", rng=random.Random(0))
    await front.sync_cluster(now=0.0)
    await front.put_requests([req("r1")], now=0.0)
    [p_item] = await client.lrange("gantry:sw:{fd}:req:p", 0, -1)
    [d_item] = await client.lrange("gantry:sw:{fd}:req:d", 0, -1)
    assert p_item == d_item
    sr = msgspec.json.decode(p_item, type=SplitRequest)
    assert (sr.prefill, sr.decode, sr.protocol) == ("p", "d", "rdma")


async def test_without_live_nodes_a_request_is_refused_not_dropped(client: aioredis.Redis) -> None:
    await node(client, "p", NodeRole.PREFILL).report(now=0.0)
    front = SplitwiseFront(client, PARAMS, "api")
    await front.sync_cluster(now=0.0)
    assert await front.put_requests([req("r1")], now=0.0) == [("r1", NO_NODES)]


async def test_get_requests_applies_the_long_prefill_quota(client: aioredis.Redis) -> None:
    m = node(client, "m", NodeRole.MIXED)
    await m.report(now=0.0)
    front = SplitwiseFront(client, PARAMS, "api")
    await front.sync_cluster(now=0.0)
    await front.put_requests([req("twelve", 12), req("ten", 10)], now=0.0)
    quota = ChunkedQuota(long_prefill_token_threshold=5, max_num_partial_prefills=4, max_long_partial_prefills=1)
    got = await m.get_requests(PullBudget(available_blocks=100, block_size=4, reserved_output_blocks=0, batch=2,
                                          chunked=quota), now=0.0)
    assert [sr.request.request_id for sr in got] == ["twelve"]


async def test_load_reported_counts_prompt_tokens_on_prefill_and_requests_on_decode(client: aioredis.Redis) -> None:
    p, d = node(client, "p", NodeRole.PREFILL), node(client, "d", NodeRole.DECODE)
    await p.report(now=0.0)
    await d.report(now=0.0)
    front = SplitwiseFront(client, PARAMS, "api", rng=random.Random(1))
    await front.sync_cluster(now=0.0)
    await front.put_requests([req("a", 300), req("b", 200)], now=0.0)
    await p.get_requests(BUDGET, now=0.0)
    await d.get_requests(BUDGET, now=0.0)
    await p.report(now=1.0)
    await d.report(now=1.0)
    loads = {n.node: n.load for n in await front.sync_cluster(now=1.0)}
    assert loads == {"p": 500, "d": 2}


async def test_the_stream_starts_on_prefill_and_ends_on_decode_at_the_front(client: aioredis.Redis) -> None:
    p, d = node(client, "p", NodeRole.PREFILL), node(client, "d", NodeRole.DECODE)
    await p.report(now=0.0)
    await d.report(now=0.0)
    front = SplitwiseFront(client, PARAMS, "api")
    await front.sync_cluster(now=0.0)
    await front.put_requests([req("a")], now=0.0)
    await p.get_requests(BUDGET, now=0.0)
    await d.get_requests(BUDGET, now=0.0)
    await p.put_results([Output(request_id="a", seq=0, num_tokens=1, finished=True)])
    await d.put_results([Output(request_id="a", seq=1, num_tokens=1), Output(request_id="a", seq=2, finished=True)])
    chunks = (await front.get_results(now=0.0))["a"]
    assert [(o.seq, o.finished, o.served_by) for o in chunks] == [(0, False, "p"), (1, False, "d"), (2, True, "d")]
    assert p.load.load == 0 and d.load.load == 0


async def test_an_expired_request_is_answered_to_the_front(client: aioredis.Redis) -> None:
    m = node(client, "m", NodeRole.MIXED)
    await m.report(now=0.0)
    front = SplitwiseFront(client, PARAMS, "api")
    await front.sync_cluster(now=0.0)
    await front.put_requests([req("late")], now=0.0)
    assert await m.get_requests(BUDGET, now=100.0) == []
    [answer] = (await front.get_results(now=0.0))["late"]
    assert answer.finished and answer.error_code == ErrorCode.EXPIRED and m.load.load == 0


async def test_the_blurred_choice_spreads_requests_over_similar_prefill_nodes(client: aioredis.Redis) -> None:
    for name in ("p1", "p2"):
        await node(client, name, NodeRole.PREFILL).report(now=0.0)
    await node(client, "d", NodeRole.DECODE).report(now=0.0)
    front = SplitwiseFront(client, PARAMS, "api", rng=random.Random(0))
    await front.sync_cluster(now=0.0)
    await front.put_requests([req(f"r{i}") for i in range(40)], now=0.0)
    sizes = [await client.llen(f"gantry:sw:{{fd}}:req:{n}") for n in ("p1", "p2")]
    assert sum(sizes) == 40 and min(sizes) > 5


def test_node_info_roundtrip() -> None:
    info = NodeInfo(node="x", role=NodeRole.DECODE, load=3, ts=1.0)
    assert msgspec.json.decode(msgspec.json.encode(info), type=NodeInfo) == info


async def test_corrupt_queue_or_result_entries_are_skipped(client: aioredis.Redis) -> None:
    m = node(client, "m", NodeRole.MIXED)
    await m.report(now=0.0)
    front = SplitwiseFront(client, PARAMS, "api")
    await front.sync_cluster(now=0.0)
    await client.lpush("gantry:sw:{fd}:req:m", b"{broken")
    await front.put_requests([req("ok")], now=0.0)
    assert [sr.request.request_id for sr in await m.get_requests(BUDGET, now=0.0)] == ["ok"] and m.corrupt == 1
    await client.lpush("gantry:sw:{fd}:resp:api", b"junk")
    await m.put_results([Output(request_id="ok", seq=0, finished=True)])
    assert list(await front.get_results(now=0.0)) == ["ok"]


async def test_a_request_whose_node_died_is_answered_expired_by_the_front_once(client: aioredis.Redis) -> None:
    m = node(client, "m", NodeRole.MIXED)
    await m.report(now=0.0)
    front = SplitwiseFront(client, PARAMS, "api")
    await front.sync_cluster(now=0.0)
    await front.put_requests([req("orphan")], now=0.0)
    await m.get_requests(BUDGET, now=1.0)  # taken into the node's memory; the node then dies
    assert await front.get_results(now=99.0) == {} and front.open_requests() == 1
    [answer] = (await front.get_results(now=100.0))["orphan"]
    assert answer.finished and answer.error_code == ErrorCode.EXPIRED and front.open_requests() == 0
    await m.put_results([Output(request_id="orphan", seq=0, finished=True)])  # a zombie's late answer
    assert await front.get_results(now=101.0) == {}


async def test_the_front_refuses_an_id_it_is_still_serving(client: aioredis.Redis) -> None:
    await node(client, "m", NodeRole.MIXED).report(now=0.0)
    front = SplitwiseFront(client, PARAMS, "api")
    await front.sync_cluster(now=0.0)
    assert await front.put_requests([req("x"), req("x")], now=0.0) == [("x", None), ("x", "duplicated request_id")]
