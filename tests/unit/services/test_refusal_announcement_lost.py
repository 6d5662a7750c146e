"""A replica whose placement request the full pipeline refused is stored with the reason "not requested: the
pipeline is full", then announced. If that announcement never reaches a reconciler replica's feed (the replica that
stored the reason was killed before announcing it, or the core-NATS event was dropped), that feed shows the replica
PENDING without a reason, while the store holds one. Neither retry path then requests it: the tick's PENDING retries
read the feed (no reason: "in flight"), and the converge's re-requests read the store (a reason: not "unrequested").
The full tick compares such replicas with the store and announces the stored record again, so the feed learns the
reason and the PENDING retries request the replica.

The real reconciler (in process, not started) on the session's real NATS and Redis; its feed hears instance events
as the running service's does (a subscription on the instance event subject)."""

from __future__ import annotations

import asyncio

from nats.aio.client import Client
from nats.aio.msg import Msg

from services.reconciler.service import PIPELINE_FULL, Reconciler
from shared.bus import streams, subjects
from shared.bus.messages import InstanceEvents, PlacementItem, PlacementRequest, decode
from shared.core.placement.domain import InstanceState
from shared.core.placement.lifecycle import ACTIVE
from shared.state.store import ScaleUp
from tests.unit.services.test_commit_backpressure import SPEC, fill, rec

__all__ = ["rec"]  # the fixture, used by name


async def requested_ids(nc: Client) -> list[str]:
    """The replicas named by the placement requests in the (purged, then refilled) requests stream."""
    js = nc.jetstream()
    info = await js.stream_info(streams.STREAM_REQUESTED)
    out: list[str] = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1) if info.state.messages else ():
        raw = await js.get_msg(streams.STREAM_REQUESTED, seq)
        out += [i.instance_id for i in decode(raw.data or b"", PlacementRequest).items]
    return out


async def test_a_refusal_whose_announcement_was_lost_is_announced_again_and_the_replica_requested(
    rec: Reconciler,
) -> None:
    nc = rec.bus.nc
    (made,) = await rec.store.converge_up([ScaleUp(model=SPEC.name, replicas=1, spec=SPEC, seq=1)], ACTIVE)
    (replica,) = made.created
    await rec.feed.load(rec.store)  # this replica's feed: the replica PENDING, in flight (no reason)
    assert rec.feed.instances[replica.id].reason is None
    assert await fill(nc) > 0

    # The pipeline refuses the request: the reason is stored; its announcement never reaches this feed (the
    # reconciler replica that refused was killed before announcing, or the core-NATS event was dropped).
    item = PlacementItem(instance_id=replica.id, model=SPEC.name)
    await rec.publish_items([item], {SPEC.name: SPEC}, rec.clock())
    (stored,) = await rec.store.instances(SPEC.name)
    assert stored.state is InstanceState.PENDING and stored.reason == PIPELINE_FULL
    assert rec.feed.instances[replica.id].reason is None
    rec.requested.clear()  # another reconciler replica's view: it never requested this replica itself

    js = nc.jetstream()
    await js.purge_stream(streams.STREAM_REQUESTED)  # the filter drained it: there is room again

    # From now on this feed hears instance events, as the running service's does.
    async def on_instance(msg: Msg) -> None:
        rec.feed.on_instances(decode(msg.data, InstanceEvents).events)

    sub = await nc.subscribe(subjects.EVENT_INSTANCE, cb=on_instance)
    try:
        for _ in range(3):  # full ticks (each re-converges every model), then ordinary ones
            await rec.tick(full=True)
            await nc.flush()
            await asyncio.sleep(0.1)
            await rec.tick()
            await asyncio.sleep(0.1)
            if replica.id in await requested_ids(nc):
                break
    finally:
        await sub.unsubscribe()
    assert replica.id in await requested_ids(nc), (
        "a PENDING replica whose stored reason never reached the feed is never requested again: "
        f"feed reason {rec.feed.instances[replica.id].reason!r}, stored {stored.reason!r}"
    )
