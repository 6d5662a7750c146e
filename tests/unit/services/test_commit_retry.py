"""The reconciler's own retry of a commit that failed outright (every reply lost on the lean connection's retries,
so Redis away as far as it knows) is answered as the first run: a commit that did land answers "ok" again, so its
DecisionEvent, assignment and SLI observation are not lost to a "dup".

The real reconciler's commit handling (in process, not started: the test hands it the scored batch as its pull
loop would, and again as the batch's redelivery) on the session's real NATS and Redis, its scripts through a relay
that loses the commit's replies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import nats
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client
from redis.exceptions import ConnectionError as RedisConnectionError

from ops.servers import ServerProcess
from services.reconciler.service import Reconciler
from shared.bus import subjects
from shared.bus.messages import DecisionEvent, DecisionEvents, ItemOutcome, PlacementItem, PlacementScored, decode
from shared.bus.runtime import Bus
from shared.core.placement.domain import GIB, Candidate, Decision, Gpu, Instance, InstanceState, ModelSpec, Worker
from shared.host.metrics import COMMITTED, SLI
from shared.settings import Settings
from shared.state import CommitItem, StateStore, lean
from shared.state.lean import ScriptConnection
from tests.unit.state.relay import Relay

SPEC = ModelSpec(name="m", weight_bytes=GIB)
W0 = Worker(name="w0", gpus=(Gpu(index=0, vram_total=80 * GIB), Gpu(index=1, vram_total=80 * GIB)),
            ram_total=64 * GIB)
DB = 5


def decision(gpu: int) -> Decision:
    candidate = Candidate(worker="w0", gpu_indexes=(gpu,), vram_claims=(2 * GIB,), strategy="single_gpu")
    return Decision(model=SPEC.name, candidate=candidate, score=1.0, breakdown={})


class Harness:
    """A reconciler whose scripts go through ``relay``, the decision events it publishes, the store it writes."""

    def __init__(self, rec: Reconciler, relay: Relay, nc: Client) -> None:
        self.rec, self.relay, self.nc = rec, relay, nc
        self.events: list[DecisionEvent] = []

    async def pending(self, iid: str) -> None:
        token = await self.rec.store.lock_model(SPEC.name)
        assert token
        assert await self.rec.store.create_pending(SPEC.name, token, [Instance(id=iid, model=SPEC.name)])
        await self.rec.store.unlock_model(SPEC.name, token)

    async def decided(self) -> list[str]:
        await self.nc.flush()
        await asyncio.sleep(0.05)  # the events' round trip through the server
        return [e.instance_id for e in self.events]


@pytest.fixture
async def harness(
    redis_server: ServerProcess, nats_server: ServerProcess, monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Harness]:
    monkeypatch.setattr(lean, "RETRIES", 2)  # the lean connection gives up sooner (the same path, fewer rounds)
    url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    rec = Reconciler(Settings(nats_url=nats_server.url, redis_url=url))
    await rec.store.close()
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    relay = Relay(parts.hostname, parts.port)
    port = await relay.start()
    scripts = ScriptConnection(host="127.0.0.1", port=port, user=parts.username, password=parts.password, db=DB,
                               timeout=0.5)
    rec.store = StateStore(aioredis.from_url(url), scripts)
    await rec.store.r.flushdb()
    await rec.store.register_workers([W0], seen_at=0.0)
    nc = await nats.connect(nats_server.url)
    rec._bus = Bus(nc, rec.name)
    h = Harness(rec, relay, nc)

    async def on_decision(msg: Any) -> None:
        h.events.extend(decode(msg.data, DecisionEvents).events)

    sub = await nc.subscribe(subjects.EVENT_DECISION, cb=on_decision)
    yield h
    await sub.unsubscribe()
    await nc.close()
    await rec.store.close()
    await relay.close()


def scored(*outcomes: ItemOutcome) -> PlacementScored:
    return PlacementScored(batch_id="b1", outcomes=outcomes, specs={SPEC.name: SPEC})


async def lost_then_retried(h: Harness, first: PlacementScored, again: PlacementScored) -> None:
    """``first`` handled with every reply of its commit lost (it fails as on Redis away), then ``again`` (the
    batch's redelivery, or what came back instead)."""
    # The script loaded first: a cut must fall on a run of it, not on a NOSCRIPT answer.
    gone = Instance(id="gone", model=SPEC.name, state=InstanceState.SCHEDULED, worker="w0", gpu_indexes=(0,),
                    vram_claims=(GIB,))
    assert await h.rec.store.commit([CommitItem(gone)]) == ["gone"]
    h.relay.cuts = lean.RETRIES + 1
    with pytest.raises(RedisConnectionError):
        await h.rec.handle_scored([first])
    assert h.relay.cuts == 0  # every try ran the script and lost its reply
    assert await h.rec.store.states(["a"]) == {"a": InstanceState.SCHEDULED}  # the first try did commit
    await h.rec.handle_scored([again])


async def test_a_commit_that_landed_though_every_reply_was_lost_is_announced_once_on_its_retry(
    harness: Harness,
) -> None:
    await harness.pending("a")
    item = PlacementItem(instance_id="a", model=SPEC.name, requested_at=1.0)  # observed by the SLI when committed
    batch = scored(ItemOutcome(item=item, decision=decision(0)))
    await lost_then_retried(harness, batch, batch)
    assert await harness.decided() == ["a"]
    registry = harness.rec.metrics.registry
    assert registry.get_sample_value(COMMITTED, {"service": harness.rec.name}) == 1  # and one SLI observation:
    assert sum(s.value for m in registry.collect() for s in m.samples if s.name == f"{SLI}_count") == 1
    assert await harness.rec.store.ledger() == {"w0:0": (2 * GIB, 80 * GIB), "w0:1": (0, 80 * GIB)}
    assert not harness.rec.unanswered


async def test_another_decision_for_the_replica_after_a_failed_commit_is_no_replay_of_it(harness: Harness) -> None:
    await harness.pending("a")
    item = PlacementItem(instance_id="a", model=SPEC.name)
    first = scored(ItemOutcome(item=item, decision=decision(0)))
    replanned = scored(ItemOutcome(item=item, decision=decision(1)))  # the replica placed again, elsewhere
    await lost_then_retried(harness, first, replanned)
    assert await harness.decided() == []  # "dup": the ledger holds the first decision, not this one
    assert await harness.rec.store.ledger() == {"w0:0": (2 * GIB, 80 * GIB), "w0:1": (0, 80 * GIB)}
    stored = await harness.rec.store.instance("a")
    assert stored is not None and stored.gpu_indexes == (0,) and stored.state is InstanceState.SCHEDULED
