"""Emulated engines fed by the global broker on a real Redis: skewed load is shared, a killed node loses nothing."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from ops.servers import ServerProcess
from services.engine_server.broker_node import BrokerNode
from shared.core.engine import Engine, SchedulerConfig
from shared.core.engine.step_time import CalibratedStepTime
from shared.core.queueing import Output, QueuedRequest, SchedulerParams
from shared.host.tasks import cancel_until_done
from shared.state.queue import GlobalBroker

PARAMS = SchedulerParams(name="global", topic="engines", min_load_score=2, ttl_s=60, sync_period_s=0.05,
                         expire_period_s=0.3)
CFG = SchedulerConfig(block_size=16, num_gpu_blocks=2000, max_num_seqs=4, max_num_batched_tokens=2048)
STEP = CalibratedStepTime(base_s=0.004, per_token_s=1e-6)


@pytest.fixture
async def client(redis_server: ServerProcess) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.from_url(redis_server.url.rsplit("/", 1)[0] + "/8")
    await r.flushdb()
    yield r
    await r.aclose()


def make_nodes(client: aioredis.Redis, n: int) -> list[BrokerNode]:
    return [BrokerNode(GlobalBroker(client, PARAMS, f"e{i}", rng=random.Random(i)), Engine(CFG, STEP))
            for i in range(n)]


async def collect(nodes: list[BrokerNode], ids: list[str], timeout_s: float) -> dict[str, list[Output]]:
    answers: dict[str, list[Output]] = {}
    deadline = time.time() + timeout_s
    reader = nodes[-1].broker
    while time.time() < deadline and sum(any(o.finished for o in v) for v in answers.values()) < len(ids):
        for nd in nodes:
            for o in await reader.results_of(nd.broker.node):
                answers.setdefault(o.request_id, []).append(o)
        await asyncio.sleep(0.02)
    return answers


async def test_idle_engines_take_work_from_the_busy_one_and_every_request_is_answered_once(
        client: aioredis.Redis) -> None:
    nodes = make_nodes(client, 3)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(nd.run(stop)) for nd in nodes]
    ids = [f"r{k}" for k in range(60)]
    await nodes[0].broker.put_requests(
        [QueuedRequest(request_id=rid, prompt_len=64, max_tokens=8, arrival_s=0.0) for rid in ids])
    answers = await collect(nodes, ids, 30)
    stop.set()
    await asyncio.gather(*tasks)
    finals = Counter(o.request_id for v in answers.values() for o in v if o.finished)
    assert sorted(finals) == sorted(ids) and max(finals.values()) == 1
    assert all([o.seq for o in v] == [0, 1] for v in answers.values())
    assert nodes[1].served > 0 and nodes[2].served > 0  # they stole from e0
    assert sum(nd.broker.stats.stolen for nd in nodes) == nodes[1].served + nodes[2].served


async def test_a_killed_engine_node_loses_nothing(client: aioredis.Redis) -> None:
    nodes = make_nodes(client, 3)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(nd.run(stop)) for nd in nodes]
    rng = random.Random(5)
    ids: list[str] = []
    flying = 0
    for k in range(120):
        origin = nodes[0] if rng.random() < 0.8 and k < 60 else nodes[1 + rng.randrange(2)]
        rid = f"k{k}"
        await origin.broker.put_requests([QueuedRequest(request_id=rid, prompt_len=64, max_tokens=20, arrival_s=0.0)])
        ids.append(rid)
        if k == 60:
            until = time.time() + 5
            while nodes[0].broker.serving() == 0 and time.time() < until:  # kill it while requests run in it
                await asyncio.sleep(0.0005)
            await cancel_until_done(tasks[:1], every=0.05)  # dies with requests running and queued in its list
            flying = await client.scard(nodes[0].broker.keys.inflight("e0"))
        await asyncio.sleep(0.002)
    answers = await collect(nodes, ids, 60)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    finals = Counter(o.request_id for v in answers.values() for o in v if o.finished)
    assert sorted(finals) == sorted(ids), f"lost: {sorted(set(ids) - set(finals))[:10]}"
    assert max(finals.values()) == 1
    assert all(len({o.seq for o in v}) == len(v) for v in answers.values())
    assert sum(nd.broker.stats.recovered for nd in nodes[1:]) >= flying  # every lease it held was taken over


def test_speedup_must_be_positive(client: aioredis.Redis) -> None:
    with pytest.raises(ValueError, match="speedup"):
        BrokerNode(GlobalBroker(client, PARAMS, "x"), Engine(CFG, STEP), speedup=0)
