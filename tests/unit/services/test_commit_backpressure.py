"""A full placement-requests stream never blocks the commit consumer: a refused commit's re-placement that the
stream refuses leaves the replica PENDING with that reason (the commit batch is done, so acked), and the tick's
PENDING retries request it again once there is room.

The real reconciler's commit handling and tick (in process, not started) on the session's real NATS and Redis,
with the requests stream made tiny and filled."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client

from ops.servers import ServerProcess
from services.reconciler.service import PIPELINE_FULL, Reconciler
from shared.bus import streams, subjects
from shared.bus.messages import ItemOutcome, PlacementItem, PlacementRequest, PlacementScored, decode
from shared.bus.runtime import Bus, prepare
from shared.core.placement.domain import GIB, Candidate, Decision, Gpu, InstanceState, ModelSpec, Worker
from shared.core.placement.lifecycle import ACTIVE
from shared.settings import Settings
from shared.state.store import ScaleUp

SPEC = ModelSpec(name="m", weight_bytes=GIB)
W0 = Worker(name="w0", gpus=(Gpu(index=0, vram_total=80 * GIB),), ram_total=64 * GIB)
DB = 6
LIMIT = 2048  # bytes the requests stream holds: a few messages


@pytest.fixture
async def rec(redis_server: ServerProcess, nats_server: ServerProcess) -> AsyncIterator[Reconciler]:
    url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    settings = Settings(nats_url=nats_server.url, redis_url=url, js_storage="memory", pipe_max_bytes=LIMIT)
    reconciler = Reconciler(settings)
    await reconciler.store.r.flushdb()
    await reconciler.store.register_workers([W0], seen_at=0.0)
    nc = await nats.connect(nats_server.url)
    await streams.delete_streams(nc.jetstream())
    await prepare(nc, settings, [(streams.STREAM_REQUESTED, streams.CONSUMER_FILTER, subjects.PLACEMENT_REQUESTED)])
    reconciler._bus = Bus(nc, reconciler.name)
    yield reconciler
    await streams.delete_streams(nc.jetstream())  # the next test provisions its own
    await nc.close()
    await reconciler.store.close()


async def fill(nc: Client) -> int:
    """Publish into the requests stream until it refuses; how many it took."""
    js = nc.jetstream()
    for n in itertools.count():
        try:
            await js.publish(subjects.PLACEMENT_REQUESTED, b"x" * 200, headers={"Nats-Msg-Id": f"fill-{n}"})
        except nats.js.errors.APIError:
            return n
    raise AssertionError("unreachable")


def too_big(iid: str) -> ItemOutcome:
    """A decision the ledger refuses (more VRAM than the GPU has): the replica is to be placed again."""
    candidate = Candidate(worker="w0", gpu_indexes=(0,), vram_claims=(100 * GIB,), strategy="single_gpu")
    decision = Decision(model=SPEC.name, candidate=candidate, score=1.0, breakdown={})
    return ItemOutcome(item=PlacementItem(instance_id=iid, model=SPEC.name), decision=decision)


async def test_a_refused_commits_replacement_refused_by_a_full_stream_waits_pending_and_is_requested_later(
    rec: Reconciler,
) -> None:
    (made,) = await rec.store.converge_up([ScaleUp(model=SPEC.name, replicas=1, spec=SPEC, seq=1)], ACTIVE)
    (replica,) = made.created
    nc = rec.bus.nc
    assert await fill(nc) > 0

    # handled to the end, not raised: the batch is acked, the commit consumer goes on
    await rec.handle_scored([PlacementScored(batch_id="b", outcomes=(too_big(replica.id),), specs={"m": SPEC})])
    assert await rec.store.states([replica.id]) == {replica.id: InstanceState.PENDING}
    (stored,) = await rec.store.instances(SPEC.name)
    assert stored.reason == PIPELINE_FULL
    assert replica.id not in rec.requested and rec.refused_since is not None

    js = nc.jetstream()
    await js.purge_stream(streams.STREAM_REQUESTED)  # the filter drained it
    await rec.feed.load(rec.store)  # the feed as the announcement made it: PENDING, with the reason
    await rec.tick()
    info = await js.stream_info(streams.STREAM_REQUESTED)
    assert info.state.messages == 1
    request = decode((await js.get_msg(streams.STREAM_REQUESTED, info.state.last_seq)).data or b"", PlacementRequest)
    assert [i.instance_id for i in request.items] == [replica.id]
    assert replica.id in rec.requested and rec.refused_since is None


async def test_a_request_larger_than_the_requests_stream_holds_waits_pending_with_its_own_reason(
    rec: Reconciler,
) -> None:
    """Such a request is refused as a full stream's are ("maximum bytes exceeded") although the stream is empty: it
    is no back-pressure (no draining makes room for it). It is not raised (the scale command or tick goes on), and
    its replicas wait PENDING with a reason saying so, not "the pipeline is full"."""
    from services.reconciler.service import TOO_LARGE
    from shared.bus.messages import PlacementItem as Item

    settings = rec.settings
    rec._bus = Bus(rec.bus.nc, rec.name, stream_bytes=streams.stream_limits(settings), storage=settings.js_storage)
    (made,) = await rec.store.converge_up([ScaleUp(model=SPEC.name, replicas=40, spec=SPEC, seq=1)], ACTIVE)
    items = [Item(instance_id=i.id, model=SPEC.name) for i in made.created]
    await rec.publish_items(items, {SPEC.name: SPEC}, rec.clock())  # one request of 40: over 2 KiB
    stored = await rec.store.instances(SPEC.name)
    assert {i.reason for i in stored} == {TOO_LARGE}
    assert not rec.requested and rec.refused_since is None
    info = await rec.bus.nc.jetstream().stream_info(streams.STREAM_REQUESTED)
    assert info.state.messages == 0
