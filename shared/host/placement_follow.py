"""A picker's view of placement (``--pool-source placement``), shared by the gateway's picker and the NATS picker.

An engine is routable only while placement holds its instance RUNNING (``shared.core.routing.pool_source``). The
follower keeps ``PlacedInstances`` current: it subscribes to the instance events first, then reads every instance
from the state store (events heard meanwhile apply after the read, in order), and reads again every ``resync_s``
and at once after a NATS reconnection (core NATS drops the events of an outage: a missed DRAINING would keep an
instance in the pool until the next read).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shared.bus import subjects
from shared.bus.messages import InstanceEvents
from shared.bus.runtime import Bus
from shared.core.routing.pool_source import PoolSource
from shared.host.engine_feed import EngineFeed, PlacedInstances

if TYPE_CHECKING:  # an engines-only picker never loads the Redis client
    from shared.state.store import StateStore

log = logging.getLogger("gantry.placement_follow")


class PlacementFollower:
    """Placement's instances for one picker's engine feed: events on NATS, the state store read beside them."""

    def __init__(self, feed: EngineFeed, placed: PlacedInstances, redis_url: str | None, resync_s: float,
                 read_timeout_s: float) -> None:
        self.feed = feed
        self.placed = placed
        self.redis_url = redis_url
        self.resync_s = resync_s
        self.read_timeout_s = read_timeout_s
        self.bus: Bus | None = None  # set before the first event can arrive (``start``)

    async def on_instances(self, msg: Msg) -> None:
        """Placement's instance events: a change of state can admit an engine or take it out of the pool."""
        assert self.bus is not None
        evs = await self.bus.decode_or_reject(msg.subject, msg.data, InstanceEvents)
        if evs is not None and self.placed.apply(evs):
            self.feed.placement_changed()

    async def start(self, nc: NATS, bus: Bus) -> StateStore:
        """Subscribe to the instance events, then read the instances from the state store; returns the store,
        kept for the later reads (the caller closes it)."""
        from shared.state.store import StateStore

        if not self.redis_url:
            raise ValueError("--pool-source placement needs the state store's URL (--redis-url or GANTRY_REDIS_URL)")
        self.bus = bus
        await nc.subscribe(subjects.EVENT_INSTANCE_ALL, cb=self.on_instances)
        await nc.flush()
        store = StateStore.from_url(self.redis_url)
        try:
            await self.read(store)
        except BaseException:
            await store.close()
            raise
        log.info("pool from placement: %d instances known", len(self.placed.placed))
        return store

    async def read(self, store: StateStore) -> None:
        """Read every instance from the state store. Events apply at once meanwhile (after the first read), and the
        read is given up after ``read_timeout_s`` (raising TimeoutError), what is held then standing."""
        self.placed.reading()
        got = None
        try:
            got = await asyncio.wait_for(store.instances(), self.read_timeout_s)
        finally:
            self.placed.load(got)
            self.feed.placement_changed()

    async def resync_forever(self, store: StateStore, wake: asyncio.Event) -> None:
        """Read the instances again every ``resync_s``, or at once when ``wake`` is set (NATS reconnected)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.resync_s)
            wake.clear()
            try:
                await self.read(store)
            except Exception as err:  # Redis away for a moment: the events keep the pool current meanwhile
                log.warning("instances not read from the state store (%r); next try in %g s", err, self.resync_s)


def add_pool_arguments(parser: argparse.ArgumentParser) -> None:
    """``--pool-source`` and ``--redis-url``, as both pickers take them."""
    parser.add_argument("--pool-source", type=PoolSource, choices=list(PoolSource), default=PoolSource.ENGINES,
                        help="engines: every engine that reports (no placement runs); placement: only engines whose "
                             "instance placement holds RUNNING, a DRAINING one leaving at once (`gantry up`, compose)")
    parser.add_argument("--redis-url", default=None,
                        help="the state store, with --pool-source placement: read at start, again periodically and "
                             "after each NATS reconnection (default: the GANTRY_* settings')")
