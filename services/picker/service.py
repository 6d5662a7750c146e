"""The picker process: the routing core kept current from NATS events (``shared.host.engine_feed``) and a
request/reply subscription answering ``PickRequest``s. Bad input is dead-lettered (and answered with an
error when it has a reply inbox); nothing a requester sends can stop the service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from services.picker.answer import answer, read_picks
from services.picker.contract import CONTRACT
from shared.bus import subjects
from shared.bus.connection import url_credentials
from shared.bus.messages import MessageError, PickAnswer, PickProgress, PickReply, encode
from shared.bus.runtime import Bus, inbox_prefix
from shared.core.limits import MAX_MESSAGE_BYTES
from shared.core.routing import Router, builtin_config
from shared.core.routing.pool_source import PoolSource
from shared.host.disconnect import close_promptly
from shared.host.engine_feed import (
    EngineFeed,
    PlacedInstances,
    SnapshotFetcher,
    expire_forever,
    take_kv_events,
    take_metrics,
)
from shared.host.metrics import MetricsServer
from shared.host.outcomes import OutcomeShare
from shared.host.placement_follow import PlacementFollower
from shared.host.report_auth import ReportVerifier
from shared.host.report_metrics import registry_for
from shared.host.warmup import until_warm

if TYPE_CHECKING:  # an engines-only picker never loads the Redis client
    from shared.state.store import StateStore

log = logging.getLogger("gantry.picker")

PICK_CHUNK = 256  # picks routed between two yields to the event loop (~25 ms at ~100 µs a pick)


class ReplyTooLarge(Exception):
    """The answers to one pick message would not fit in one NATS reply."""


@dataclass(frozen=True, slots=True)
class PickerOptions:
    """What ``python -m services.picker`` accepts."""

    nats_url: str
    profile: str = "default"
    expire_s: float = 3.0
    seed: int = 0
    # a request's end arrives as a PickProgress on core NATS (at most once) from a caller that may never send
    # it: past these, the request stops counting as in flight (its load and memory released)
    flight_ttl_s: float = 1800.0
    max_in_flight: int = 100_000
    # the engines' report master key: a message not signed by the instance it claims is dropped
    # (shared.host.report_auth); None: every report is taken
    report_master: bytes | None = None
    metrics_port: int = 0  # Prometheus /metrics (the refused engine reports) on this port; 0: not served
    metrics_host: str = "0.0.0.0"  # ... on this address (``gantry up``: 127.0.0.1)
    # PLACEMENT: pick only engines whose instance placement holds RUNNING (instance events on NATS, the state store
    # read through redis_url at start, every resync_s and after a NATS reconnection); ENGINES: every engine reporting
    pool_source: PoolSource = PoolSource.ENGINES
    redis_url: str | None = None
    resync_s: float = 30.0
    read_timeout_s: float = 10.0  # PLACEMENT: a read of the instances given up after this long


@dataclass
class PickerCounters:
    """What the picker did (logged at exit; read by tests)."""

    messages: int = 0
    picks: int = 0
    refused: dict[int, int] = field(default_factory=dict)
    rejected: int = 0


class PickerService:
    """One picker replica."""

    def __init__(self, opts: PickerOptions, clock: Callable[[], float] = time.time) -> None:
        self.opts = opts
        self.clock = clock
        self.router = Router(builtin_config(opts.profile), seed=opts.seed)
        self.placed = PlacedInstances()
        self.feed = EngineFeed(self.router, opts.expire_s, verifier=ReportVerifier(opts.report_master)
                               if opts.report_master is not None else None, source=opts.pool_source,
                               placed=self.placed.placed)
        self.follower = PlacementFollower(self.feed, self.placed, opts.redis_url, opts.resync_s, opts.read_timeout_s)
        self.reconnected = asyncio.Event()  # set by a NATS reconnection: placement is read again at once
        self.snapshots = SnapshotFetcher(self.feed)  # a late or restarted replica learns the engines' caches
        # failures of the requests this replica placed, told to the others (progress names no endpoint)
        self.outcomes = OutcomeShare(self.router.state, subjects.PICKER_OUTCOMES)
        self.counters = PickerCounters()
        self.metrics = registry_for(CONTRACT.service, self.feed.verifier, self.outcomes)
        self.bus: Bus | None = None

    async def on_pick(self, msg: Msg) -> None:
        """Answer a pick request; a malformed one is dead-lettered and answered with the reason."""
        assert self.bus is not None
        self.counters.messages += 1
        if not msg.reply:
            # routing it would count its picks in flight on their endpoints (until --flight-ttl-s) for requests
            # nobody can send: the answer has nowhere to go
            await self.bus.dead_letter(msg.subject, "pick request without a reply inbox: nothing routed", msg.data)
            self.counters.rejected += 1
            return
        try:
            items = read_picks(msg.data)
        except MessageError as exc:
            await self.bus.dead_letter(msg.subject, str(exc), msg.data)
            self.counters.rejected += 1
            await msg.respond(encode(PickReply(error="invalid PickRequest (details on the dead-letter subject)")))
            return
        bad = [(i, it) for i, it in enumerate(items) if isinstance(it, str)]
        if bad:  # the valid items are still answered; the bad ones get BAD_ITEM with their reason
            i, why = bad[0]
            await self.bus.dead_letter(msg.subject, f"{len(bad)} of {len(items)} picks invalid; item {i}: {why}",
                                       msg.data)
        answers: list[PickAnswer] = []
        try:
            for start in range(0, len(items), PICK_CHUNK):
                if start:
                    # a message may hold 20,000 picks (~2 s of routing): let the engines' reports and the pool's
                    # expiry run between chunks, or every endpoint looks stale, then silent, and leaves the pool
                    await asyncio.sleep(0)
                now, addresses = self.clock(), self.feed.addresses
                answers += [answer(self.router, item, addresses, now) for item in items[start:start + PICK_CHUNK]]
            reply = encode(PickReply(answers=answers))
            if len(reply) > self.max_reply():  # (each answer repeats its id and adds endpoints: larger than asked)
                raise ReplyTooLarge(f"a reply of {len(reply)} bytes, past the {self.max_reply()} NATS carries: "
                                    f"send fewer picks a message")
            await msg.respond(reply)
        except BaseException:
            # nobody got these picks: booked, they loaded their endpoints as phantoms for the whole flight TTL
            for a in answers:
                if a.code == 200:
                    self.router.finished(a.request_id)
            raise
        for a in answers:
            if a.code == 200:
                self.counters.picks += 1
            else:
                self.counters.refused[a.code] = self.counters.refused.get(a.code, 0) + 1
        self.router.flush()  # the assumed-state insertions, after the reply left

    def max_reply(self) -> int:
        """The largest reply the connection's server takes (its ``max_payload``; the project's bound without one)."""
        nc = getattr(self.bus, "nc", None)
        return int(getattr(nc, "max_payload", 0) or MAX_MESSAGE_BYTES)

    async def on_progress(self, msg: Msg) -> None:
        """First tokens and ends of placed requests (ids this replica did not place are ignored)."""
        assert self.bus is not None
        p = await self.bus.decode_or_reject(msg.subject, msg.data, PickProgress)
        if p is None:
            return
        for rid in p.first_token:
            self.router.first_token(rid)
        for rid in p.finished:
            self.router.finished(rid)
        for rid in p.failed:
            self.router.finished(rid, ok=False, now=self.clock())

    async def on_outcomes(self, msg: Msg) -> None:
        """The other replicas' engine failures (``OutcomeShare``)."""
        assert self.bus is not None
        await self.outcomes.on_message(self.bus, msg)

    async def on_metrics(self, msg: Msg) -> None:
        """An engine's state report (joins it to the pool)."""
        assert self.bus is not None
        await take_metrics(self.feed, self.bus, msg, self.clock())

    async def on_kv(self, msg: Msg) -> None:
        """An engine's KV-cache events."""
        assert self.bus is not None
        await take_kv_events(self.feed, self.bus, msg)

    def expire_flights(self) -> int:
        """Let go of requests whose end was never heard (see ``PickerOptions.flight_ttl_s``); returns how many."""
        gone = self.router.expire_flights(self.clock(), self.opts.flight_ttl_s, self.opts.max_in_flight)
        if gone:
            log.warning("picker: %d requests in flight with no end reported (oldest %s) no longer count", len(gone),
                        gone[0])
        return len(gone)

    async def _expire_flights_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.expire_flights()

    def _guarded(self, handler: Callable[[Msg], Awaitable[None]]) -> Callable[[Msg], Awaitable[None]]:
        async def deliver(msg: Msg) -> None:
            try:
                await handler(msg)
            except Exception as exc:  # a bug on some input must not end the subscription: report it
                log.exception("picker: handling a message on %s failed", msg.subject)
                if self.bus is not None:
                    with contextlib.suppress(Exception):
                        await self.bus.dead_letter(msg.subject, f"{type(exc).__name__}: {exc}", msg.data)
                        if msg.reply and msg.subject == subjects.PICK:
                            await msg.respond(encode(PickReply(error=f"internal error: {type(exc).__name__}")))

        return deliver

    async def connect(self) -> Client:
        """Connect and subscribe; returns the connection."""
        credentials = url_credentials(self.opts.nats_url)  # decoded: nats-py sends the URL's as written
        async def on_reconnect() -> None:
            self.reconnected.set()

        nc = await nats.connect(self.opts.nats_url, max_reconnect_attempts=-1, reconnected_cb=on_reconnect,
                                inbox_prefix=inbox_prefix(credentials.get("user", "")), **credentials)
        self.bus = self.snapshots.bus = Bus(nc, CONTRACT.service, declared=CONTRACT.emit_check())
        await nc.subscribe(subjects.ENGINE_METRICS_ALL, cb=self._guarded(self.on_metrics))
        await nc.subscribe(subjects.ENGINE_KV_EVENTS_ALL, cb=self._guarded(self.on_kv))
        await nc.subscribe(subjects.PICK_PROGRESS, cb=self._guarded(self.on_progress))
        await nc.subscribe(subjects.PICKER_OUTCOMES, cb=self._guarded(self.on_outcomes))
        await nc.flush()
        return nc

    async def join_when_warm(self, nc: Client) -> None:
        """Join the pick queue group once warm (``shared.host.warmup``: its engines and its peers heard, at most 3 s
        after it starts; called once subscribed to both). A replica joining at once took its share of picks before it
        had heard any engine and refused them 503, "no endpoint serves model", while its peers could route them (a CI
        run: a second replica started mid-run refused its first pick); joining as soon as it had heard the engines, it
        listed an engine its peers had left out as broken until their next digest came (another CI run)."""
        await until_warm(self.router.state)
        await nc.subscribe(subjects.PICK, queue=subjects.PICK_QUEUE, cb=self._guarded(self.on_pick))
        await nc.flush()

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Serve until cancelled."""
        nc = await self.connect()
        store: StateStore | None = None
        if self.opts.pool_source is PoolSource.PLACEMENT:
            assert self.bus is not None
            try:
                store = await self.follower.start(nc, self.bus)
            except BaseException:
                await close_promptly(nc)
                raise
        metrics = MetricsServer(self.metrics, self.opts.metrics_port, CONTRACT.service, self.opts.metrics_host)
        expire = asyncio.create_task(expire_forever(self.feed, self.opts.expire_s, self.clock))
        flights = asyncio.create_task(self._expire_flights_forever())
        assert self.bus is not None
        tasks = [expire, flights, asyncio.create_task(self.outcomes.send_forever(self.bus))]
        if store is not None:
            tasks.append(asyncio.create_task(self.follower.resync_forever(store, self.reconnected)))
        await self.join_when_warm(nc)
        log.info("gantry picker on %s (profile %s)", subjects.PICK, self.opts.profile)
        if ready is not None:
            ready.set()
        try:
            await asyncio.Event().wait()
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if store is not None:
                await store.close()
            await self.snapshots.close()
            log.info("picker: %s", self.counters)
            metrics.close()
            await close_promptly(nc)  # bounded: NATS may be gone or not answering
