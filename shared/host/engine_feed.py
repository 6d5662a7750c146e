"""A routing core kept current from the model servers' own reports (model-server protocol, routing spec §1).

Shared by every picker front (the gateway's Envoy ext_proc server, the NATS request/reply picker): an engine
joins the pool with its first ``EngineMetrics`` and leaves when silent for ``expire_s`` (a killed server stops
reporting; the routing core's staleness filter keeps it out of decisions long before that); its load comes
from the same reports and its cache from its ``EngineKVEvents``, numbered per instance so that a gap (lost
messages, a restarted server) clears what is known of that cache. Pure apart from the router it feeds:
messages and ``now`` come in. Nothing is scraped per request.

A picker that starts late (or restarts) would know nothing of what the engines already cache until new events
came: when an engine becomes routable, and after a gap in its numbering, the picker asks it for a snapshot of its
prefix cache (``fetch_snapshot``: signed like its reports, bound to the request by a nonce), which replaces what
is known of that cache; then only the events numbered from the snapshot's ``next_seq`` on are applied.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol
from urllib.parse import urlsplit

from shared.bus import subjects
from shared.bus.messages import EngineKVEvents, EngineKVSnapshot, EngineMetrics, InstanceEvents, KVSnapshotRequest
from shared.bus.runtime import Bus
from shared.core.kv_events import AllBlocksCleared, BlockStored, KVEventBatch
from shared.core.limits import MAX_POOL_ENDPOINTS
from shared.core.placement.domain import Instance
from shared.core.roles import NodeRole
from shared.core.routing import Endpoint, EndpointMetrics, Router
from shared.core.routing.pool_source import Placed, PoolSource, refusal
from shared.host.contract import Consumes, Emits
from shared.host.report_auth import ACCEPTED, KV, METRICS, RESTARTED, SNAPSHOT, WHY, ReportVerifier

log = logging.getLogger("gantry.picker")

SNAPSHOT_TIMEOUT_S = 2.0  # an engine that does not answer in time (an old server, NATS away) stays as before
SNAPSHOT_ATTEMPTS_S = (SNAPSHOT_TIMEOUT_S, 4.0, 8.0)
"""The wait for each ask of an engine that has not answered yet: a busy engine or a loaded host may answer the
first ask too late (the answer is then dropped), and without another ask the picker would route blind to that
cache until a gap in its events. Three asks, then the events alone (an old server never answers)."""
SNAPSHOT_RETRY_PAUSE_S = 0.5  # between two asks (no responders is answered at once: not a tight loop)
SNAPSHOT_CHUNK = 2048
"""Block hashes applied per turn of the event loop: a 20k-block snapshot yields ~10 times, so a check waits for
one chunk (~1 ms), never the whole snapshot."""
MAX_HELD_EVENTS = 1024  # KV messages of one engine held while its snapshot applies; more count as a gap

FEED_CONSUMES = (
    Consumes(subjects.ENGINE_METRICS_ALL, EngineMetrics, "the pool (an engine joins with its first report, leaves "
             "when silent) and each engine's load"),
    Consumes(subjects.ENGINE_KV_EVENTS_ALL, EngineKVEvents, "the precise prefix index; a gap in an engine's "
             "numbering clears what is known of its cache"),
    Consumes(subjects.EVENT_INSTANCE_ALL, InstanceEvents, "placement's instance changes (--pool-source placement): "
             "an engine is routable only while its instance is RUNNING; DRAINING or removed takes it out of the "
             "pool at once"),
)
"""What every service keeping an ``EngineFeed`` reads (its contract's share, declared once for them all)."""
SNAPSHOT_EMITS = Emits(subjects.ENGINE_KV_SNAPSHOT_ALL, KVSnapshotRequest, "asks an engine it first routes to (or "
                       "lost KV events of) for its prefix-cache snapshot (request/reply; the answer is signed like "
                       "its reports)")
"""What an ``EngineFeed`` sends: its asks for a prefix-cache snapshot."""


class Delivered(Protocol):
    """What the feed reads of a message: a NATS ``Msg``, or one relayed from another process."""

    @property
    def subject(self) -> str: ...

    @property
    def data(self) -> bytes: ...

    @property
    def headers(self) -> dict[str, str] | None: ...


def address_of(url: str) -> str:
    """``host:port`` of an engine's base URL (what a proxy dials; an IPv6 host in brackets, or ``::1:8000``
    would read as host ``::1:8000`` without a port); raises ValueError without a port."""
    parts = urlsplit(url)
    if not parts.hostname or parts.port is None:
        raise ValueError(f"engine url {url!r} has no host:port")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{parts.port}"


def endpoint_of(msg: EngineMetrics) -> Endpoint:
    """The routable endpoint an engine's report describes."""
    try:
        role = NodeRole(msg.role)
    except ValueError:
        role = NodeRole.MIXED
    return Endpoint(id=msg.instance_id, model=msg.model, address=address_of(msg.url), role=role,
                    block_size=msg.block_size, num_gpu_blocks=msg.num_gpu_blocks, max_loras=msg.max_loras)


def metrics_of(msg: EngineMetrics) -> EndpointMetrics:
    """The routing core's view of an engine's load."""
    return EndpointMetrics(ts=msg.ts, waiting=msg.num_requests_waiting, running=msg.num_requests_running,
                           kv_usage=msg.kv_cache_usage_perc, active_loras=tuple(msg.running_loras),
                           waiting_loras=tuple(msg.waiting_loras))


@dataclass
class PoolView:
    """Endpoints heard from recently, keyed by instance id."""

    expire_s: float = 3.0
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    last_heard: dict[str, float] = field(default_factory=dict)
    max_endpoints: int = MAX_POOL_ENDPOINTS

    def observe(self, msg: EngineMetrics, now: float) -> bool:
        """Record a report; True when the endpoint set changed (joined, or moved/changed). Raises ValueError
        (nothing recorded) for a newcomer when the pool already holds ``max_endpoints``."""
        ep = endpoint_of(msg)
        if ep.id not in self.endpoints and len(self.endpoints) >= self.max_endpoints:
            raise ValueError(f"pool full ({self.max_endpoints} model servers): {ep.id} not admitted")
        self.last_heard[ep.id] = now
        changed = self.endpoints.get(ep.id) != ep
        self.endpoints[ep.id] = ep
        return changed

    def expire(self, now: float) -> list[str]:
        """Drop endpoints silent for longer than ``expire_s``; returns their ids."""
        gone = [eid for eid, t in self.last_heard.items() if now - t > self.expire_s]
        for eid in gone:
            del self.last_heard[eid]
            del self.endpoints[eid]
        return gone

    def by_address(self) -> dict[str, str]:
        """Endpoint id of each ``host:port``."""
        return {ep.address: ep.id for ep in self.endpoints.values()}


class PlacedInstances:
    """Placement's instances as a picker follows them: (model, state) by instance id, from the state store at
    start and the instance events after (each event carries the instance's whole record, in publish order)."""

    def __init__(self) -> None:
        self.placed: dict[str, Placed] = {}
        self._buffer: list[InstanceEvents] | None = []  # events heard before the first load, replayed after it
        self._touched: set[str] | None = None  # ids events changed since a later read started

    @property
    def loaded(self) -> bool:
        """Whether the initial state has been read."""
        return self._buffer is None

    def reading(self) -> None:
        """A read of the state store starts. Before the first load, events wait for it. On a later read (after
        a NATS outage the events missed are lost, and a periodic read bounds how long a missed one can mislead)
        they apply at once, never held back behind a slow store (a DRAINING must take an instance out now),
        and the instances they touch are remembered so that ``load`` leaves them alone."""
        if self._buffer is None:
            self._touched = set()

    def load(self, instances: Iterable[Instance] | None) -> None:
        """The state store's instances. The first time, then the events heard while reading them, in order:
        the store is written before an event is published, so the last buffered event of an instance is never
        older than what was read. On a later read, an instance an event touched meanwhile keeps what the event
        said (the read may predate it). None (the read failed): what is held stands."""
        touched, self._touched = self._touched or set(), None
        if instances is not None:
            kept = {iid: self.placed[iid] for iid in touched if iid in self.placed}
            self.placed.clear()  # in place: the feed holds this mapping
            self.placed.update((i.id, Placed(i.model, i.state)) for i in instances if i.id not in touched)
            self.placed.update(kept)
        buffered, self._buffer = self._buffer or [], None
        for evs in buffered:
            self.apply(evs)

    def apply(self, evs: InstanceEvents) -> bool:
        """One message of instance events; True when some instance's model or state changed (buffered, and
        False, before the first load)."""
        if self._buffer is not None:
            self._buffer.append(evs)
            return False
        changed = False
        for ev in evs.events:
            iid = ev.instance.id
            if self._touched is not None:
                self._touched.add(iid)
            if ev.removed:
                changed |= self.placed.pop(iid, None) is not None
                continue
            now = Placed(ev.instance.model, ev.instance.state)
            if self.placed.get(iid) != now:
                self.placed[iid] = now
                changed = True
        return changed


class EngineFeed:
    """The pool view and the router it feeds; ``on_pool`` hears of every change of the routable endpoint set.

    With ``source`` PLACEMENT, an engine that reports is routable only while ``placed`` (kept current by the
    owner, who calls ``placement_changed`` after each change) holds its instance RUNNING for its model
    (``shared.core.routing.pool_source``); the rest stay in ``pool`` (their reports and KV numbering are
    followed) but not in the router nor in ``addresses``.

    With a ``verifier`` (the picker holds the engines' master key), ``take_metrics`` and ``take_kv_events`` drop
    every message not signed with the key of the instance it claims, or not newer than the last one taken of
    that instance (a replay: ``shared.host.report_auth``).
    """

    def __init__(self, router: Router, expire_s: float = 3.0,
                 on_pool: Callable[[list[Endpoint]], None] | None = None, ip_only: bool = False,
                 source: PoolSource = PoolSource.ENGINES, placed: Mapping[str, Placed] | None = None,
                 verifier: ReportVerifier | None = None,
                 want_snapshot: Callable[[str], None] | None = None) -> None:
        self.router = router
        # hears the id of an engine whose cache this picker should ask for (it became routable, or lost events)
        self.want_snapshot = want_snapshot
        self._loading: dict[str, list[EngineKVEvents]] = {}  # engines whose snapshot is being applied: held events
        self.verifier = verifier
        # Envoy's file-based EDS takes IP addresses only, and one host name in the file makes it reject the
        # whole update (the pool then freezes for every engine): the gateway admits IP literals only
        self.ip_only = ip_only
        self.pool = PoolView(expire_s=expire_s)
        self.on_pool = on_pool
        self.source = source
        self.placed: Mapping[str, Placed] = placed if placed is not None else {}
        self.addresses: dict[str, str] = {}  # routable endpoint id → host:port
        self.routable: list[Endpoint] = []
        self._kv_seq: dict[str, int] = {}  # next KV message number expected per instance
        # per instance whose numbering last jumped forward, the number expected before the jump, until a snapshot
        # or the numbering's return confirms which numbering is the engine's (a forged or misnumbered message far
        # ahead would otherwise make every real one look already applied, and refuse the snapshot that heals it)
        self._kv_gap: dict[str, int] = {}

    def _admitted(self) -> list[Endpoint]:
        return [e for e in self.pool.endpoints.values()
                if refusal(self.source, e.id, e.model, self.placed) is None]

    def _changed(self) -> None:
        eps = self._admitted()
        if eps == self.routable:
            return
        joined = [e.id for e in eps if e.id not in self.addresses]
        self.routable = eps
        self.router.set_endpoints(eps)
        self.addresses = {e.id: e.address for e in eps}
        log.info("pool: %s", sorted(self.addresses.items()))
        if self.on_pool is not None:
            self.on_pool(eps)
        if self.want_snapshot is not None:
            for eid in joined:
                self.want_snapshot(eid)

    def placement_changed(self) -> None:
        """Placement's instances changed: admit and drop engines accordingly (a DRAINING instance leaves at
        once; its requests in flight stay booked until they end)."""
        self._changed()

    def on_metrics(self, m: EngineMetrics, now: float) -> None:
        """An engine's state report; raises ValueError (nothing changed) when its URL has no host:port (or no IP
        address, with ``ip_only``) or it is stamped more than ``expire_s`` ahead of ``now``."""
        if self.ip_only:
            host = address_of(m.url).rsplit(":", 1)[0].strip("[]")
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"engine url {m.url!r}: this picker's Envoy dials IP addresses only (a host name "
                                 f"in its endpoint file makes it reject every pool update)") from None
            if getattr(ip, "scope_id", None):
                # Python reads an IPv6 zone (fe80::1%eth0, any text after the %), Envoy does not: it rejected the
                # whole endpoint file, and every later one while that engine kept reporting
                raise ValueError(f"engine url {m.url!r}: an IPv6 address with a zone, which Envoy's endpoint file "
                                 f"does not take")
        if m.ts - now > self.pool.expire_s:
            # the core keeps the newest report and ignores older ones: one stamped far ahead would freeze the
            # endpoint's load and keep it looking fresh (never stale) until the clocks met, however long
            raise ValueError(f"report of {m.instance_id} stamped {m.ts - now:.1f} s ahead of this picker's clock "
                             f"(more than {self.pool.expire_s:g} s): clocks out of sync")
        if self.source is PoolSource.PLACEMENT and m.instance_id not in self.placed:
            # an id placement never issued (or has deleted): kept out of the pool, else strays and forged ids
            # would fill it up to its limit and real engines be refused (placement holds its instances from
            # PENDING on, before their engine can report)
            return
        if self.pool.observe(m, now):
            self._changed()
        self.router.update_metrics(m.instance_id, metrics_of(m))

    def on_kv(self, ev: EngineKVEvents) -> None:
        """An engine's KV events (a gap in its numbering first clears what is known of its cache, a message
        numbered below the next one expected is a repeat and changes nothing, one numbered 0 is a restarted
        server); events of an engine not in the pool (it has not reported its load yet, or has left) are
        dropped."""
        if ev.instance_id not in self.pool.endpoints:
            # numbering kept only for members: ids that never join (or left) would otherwise each leave an
            # entry behind forever (the core drops their events anyway)
            return
        if self._loading and self._hold(ev):  # empty but while a snapshot applies: one test per message
            return
        iid = ev.instance_id
        expected = self._kv_seq.get(iid)
        if expected is not None and ev.seq != expected:
            # a snapshot can be newer than an event 0 still on its way; with signed reports a restart shows as a
            # new epoch (``restarted``, which forgets the numbering), so there an event 0 below the expected one
            # is old
            behind = (ev.seq > 0 or self.verifier is not None) and ev.seq < expected
            before_jump = self._kv_gap.get(iid)
            if behind and (before_jump is None or ev.seq < before_jump):
                # a message already applied (a redelivery or a replay): applying it again would not be a gap but
                # a step back, and would make the next real message look like one; a restarted server counts
                # from 0
                log.debug("KV events %d of %s already applied (next is %d): ignored", ev.seq, iid, expected)
                return
            # a gap, a restart, or (behind) a message numbered between the last jump's two ends: that jump was
            # not the engine's own numbering, this one is
            log.info("KV events of %s jumped from %d to %d; its precise index is rebuilt", iid, expected, ev.seq)
            self._kv_gap.pop(iid, None)
            if ev.seq > expected >= 0:
                self._kv_gap[iid] = expected
            self.router.apply_kv_events(iid, KVEventBatch(ts=ev.batch.ts, events=[AllBlocksCleared()]))
            if self.want_snapshot is not None:
                self.want_snapshot(iid)
        self._kv_seq[iid] = ev.seq + 1
        self.router.apply_kv_events(ev.instance_id, ev.batch)

    def _hold(self, ev: EngineKVEvents) -> bool:
        """Hold ``ev`` when its engine's snapshot is being applied (it follows the snapshot, in order)."""
        held = self._loading.get(ev.instance_id)
        if held is None:
            return False
        if len(held) < MAX_HELD_EVENTS:
            held.append(ev)
        else:
            self._kv_seq[ev.instance_id] = -1  # the next event applied shows a gap: the index is rebuilt
        return True

    def restarted(self, instance_id: str) -> None:
        """A later process of ``instance_id`` signed a message (the verifier saw a new epoch): its cache starts
        empty, so what is known of the previous one's goes, and its KV numbering starts over (a KV message of
        the new process numbered below the old one's would otherwise be ignored as a repeat)."""
        self._loading.pop(instance_id, None)
        self._kv_gap.pop(instance_id, None)
        if self._kv_seq.pop(instance_id, None) is not None:
            self.router.apply_kv_events(instance_id, KVEventBatch(ts=0.0, events=[AllBlocksCleared()]))

    def begin_snapshot(self, snap: EngineKVSnapshot) -> bool:
        """Start applying an engine's prefix-cache snapshot: what is known of its cache is cleared and its KV
        events are held until ``end_snapshot``. False (nothing changed) for an engine not in the pool, one whose
        snapshot is already being applied, or a snapshot older than events already applied (it would undo them;
        those events keep the index current from here anyway)."""
        iid = snap.instance_id
        expected = self._kv_seq.get(iid)
        # after an unconfirmed jump the snapshot's numbering is the engine's own, whatever the jump said
        if iid not in self.pool.endpoints or iid in self._loading or (
                expected is not None and snap.next_seq < expected and iid not in self._kv_gap):
            return False
        self._kv_gap.pop(iid, None)
        self._kv_seq[iid] = snap.next_seq
        self._loading[iid] = []
        self.router.apply_kv_events(iid, KVEventBatch(ts=0.0, events=[AllBlocksCleared()]))
        return True

    def snapshot_chunk(self, snap: EngineKVSnapshot, start: int, block_size: int) -> bool:
        """Apply ``SNAPSHOT_CHUNK`` of the snapshot's hashes from ``start``; False once the engine's snapshot was
        abandoned meanwhile (it restarted or left: what the snapshot said no longer holds)."""
        if snap.instance_id not in self._loading:
            return False
        hashes = snap.block_hashes[start:start + SNAPSHOT_CHUNK]
        self.router.apply_kv_events(snap.instance_id, KVEventBatch(ts=0.0, events=[
            BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=[], block_size=block_size)]))
        return True

    def end_snapshot(self, instance_id: str) -> None:
        """The snapshot is applied: the events held meanwhile follow it (those it covers are ignored)."""
        held = self._loading.pop(instance_id, None)
        for ev in held or ():
            self.on_kv(ev)

    def expire(self, now: float) -> list[str]:
        """Drop silent engines (their KV numbering too); returns their ids."""
        gone = self.pool.expire(now)
        if gone:
            for eid in gone:
                self._kv_seq.pop(eid, None)
                self._kv_gap.pop(eid, None)
                self._loading.pop(eid, None)
            self._changed()
        return gone


async def take_metrics(feed: EngineFeed, bus: Bus, msg: Delivered, now: float) -> None:
    """An engine's state report off the bus into ``feed``; an undecodable one or an address nobody could dial
    goes to the dead letters; with a verifier, so does one not signed by the instance it claims, or replayed."""
    m = await bus.decode_or_reject(msg.subject, msg.data, EngineMetrics)
    if m is None:
        return
    if feed.verifier is not None and not await _signed(feed, feed.verifier, bus, m.instance_id, msg, METRICS):
        return
    try:
        feed.on_metrics(m, now)
    except ValueError as err:
        await bus.dead_letter(msg.subject, str(err), msg.data)


async def take_kv_events(feed: EngineFeed, bus: Bus, msg: Delivered) -> None:
    """An engine's KV-cache events off the bus into ``feed`` (undecodable ones go to the dead letters; with a
    verifier, unsigned, forged or replayed ones too)."""
    ev = await bus.decode_or_reject(msg.subject, msg.data, EngineKVEvents)
    if ev is None:
        return
    if feed.verifier is None or await _signed(feed, feed.verifier, bus, ev.instance_id, msg, KV):
        feed.on_kv(ev)


async def _signed(feed: EngineFeed, verifier: ReportVerifier, bus: Bus, instance_id: str, msg: Delivered,
                  kind: int) -> bool:
    """Whether ``msg`` may be applied: signed by ``instance_id``'s key and newer than the last message of its
    kind taken. One that is not is bad input like an undecodable one: counted, logged at a bounded rate and
    reported on the dead letters. The first message of a restarted server first drops its predecessor's cache."""
    verdict = verifier.admit(instance_id, msg.data, msg.headers, msg.subject, kind)
    if verdict is ACCEPTED:
        return True
    if verdict is RESTARTED:
        feed.restarted(instance_id)
        return True
    await bus.dead_letter(msg.subject, f"claiming instance {instance_id!r}: {WHY[verdict]}", msg.data)
    return False


async def expire_forever(feed: EngineFeed, expire_s: float, clock: Callable[[], float]) -> None:
    """Drop silent engines from ``feed`` until cancelled (checked at least every second)."""
    while True:
        await asyncio.sleep(min(1.0, expire_s / 2))
        feed.expire(clock())


class _Answer:
    """A snapshot answer as ``_signed`` reads it, named by the subject it was asked on (the dead letters' key)."""

    def __init__(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        self.subject, self.data, self.headers = subject, data, headers


class Fetched(Enum):
    """What one ask for a snapshot came to."""

    APPLIED = "applied"
    NO_ANSWER = "no answer"  # timed out, no responders, NATS away: worth asking again
    NOT_APPLIED = "not applied"  # answered, but refused (dead-lettered) or older than what is already known


async def fetch_snapshot(feed: EngineFeed, bus: Bus, instance_id: str,
                         timeout_s: float = SNAPSHOT_TIMEOUT_S) -> Fetched:
    """Ask ``instance_id``'s engine once for its prefix-cache snapshot and apply it (a chunk per turn of the event
    loop). No answer in time leaves the index as it was; an answer that is undecodable, for another instance or
    request, or (with a verifier) unsigned, forged or replayed goes to the dead letters."""
    subject = subjects.engine_kv_snapshot(instance_id)
    nonce = secrets.token_hex(16)
    try:
        reply = await bus.request(subject, KVSnapshotRequest(nonce=nonce), timeout_s)
    except Exception as err:  # timeout, no responders, NATS away: routing goes on with the events alone
        log.info("no prefix-cache snapshot from %s (%s)", instance_id, type(err).__name__)
        return Fetched.NO_ANSWER
    snap = await bus.decode_or_reject(subject, reply.data, EngineKVSnapshot)
    if snap is None:
        return Fetched.NOT_APPLIED
    if snap.instance_id != instance_id or snap.nonce != nonce:
        await bus.dead_letter(subject, f"snapshot answer for {snap.instance_id!r} to another request", reply.data)
        return Fetched.NOT_APPLIED
    answer = _Answer(subject, reply.data, reply.headers)
    if feed.verifier is not None and not await _signed(feed, feed.verifier, bus, instance_id, answer, SNAPSHOT):
        return Fetched.NOT_APPLIED
    return Fetched.APPLIED if await apply_snapshot(feed, snap) else Fetched.NOT_APPLIED


async def fetch_snapshot_until_answered(feed: EngineFeed, bus: Bus, instance_id: str,
                                        attempts_s: Iterable[float] = SNAPSHOT_ATTEMPTS_S,
                                        pause_s: float = SNAPSHOT_RETRY_PAUSE_S) -> Fetched:
    """Ask again (waiting ``attempts_s`` for each ask) while the engine has not answered and is still in the pool;
    an answer, applied or refused, ends it (a refused one is not asked for again: that would invite a flood)."""
    outcome = Fetched.NO_ANSWER
    for k, timeout_s in enumerate(attempts_s):
        if k:
            await asyncio.sleep(pause_s)
        if instance_id not in feed.pool.endpoints:
            break  # it left: nothing to learn of it
        outcome = await fetch_snapshot(feed, bus, instance_id, timeout_s)
        if outcome is not Fetched.NO_ANSWER:
            break
    return outcome


async def apply_snapshot(feed: EngineFeed, snap: EngineKVSnapshot) -> bool:
    """Apply a verified snapshot to ``feed``, yielding to the event loop between chunks; True when applied."""
    ep = feed.pool.endpoints.get(snap.instance_id)
    if ep is None or not feed.begin_snapshot(snap):
        return False
    try:
        for start in range(0, len(snap.block_hashes), SNAPSHOT_CHUNK):
            if start:
                await asyncio.sleep(0)
            if not feed.snapshot_chunk(snap, start, ep.block_size):
                return False
    finally:
        feed.end_snapshot(snap.instance_id)
    log.info("prefix cache of %s from its snapshot: %d blocks (of %d), events from %d on",
             snap.instance_id, len(snap.block_hashes), snap.total, snap.next_seq)
    return True


class SnapshotFetcher:
    """Asks engines for their prefix-cache snapshots in the background (``feed.want_snapshot``), one request per
    engine at a time; idle until ``bus`` is set (the service connected)."""

    def __init__(self, feed: EngineFeed) -> None:
        self.feed = feed
        self.bus: Bus | None = None
        self._tasks: dict[str, asyncio.Task[Fetched]] = {}
        # wanted again while a fetch was under way (its engine lost events meanwhile): the answer under way may be
        # older than that loss, and then is not applied, so one more fetch follows it
        self._again: set[str] = set()
        feed.want_snapshot = self.want

    def want(self, instance_id: str) -> None:
        """Fetch ``instance_id``'s snapshot, or once more after the fetch of it under way (called on the event loop)."""
        if self.bus is None:
            return
        if instance_id in self._tasks:
            self._again.add(instance_id)
            return
        task = asyncio.get_running_loop().create_task(fetch_snapshot_until_answered(self.feed, self.bus, instance_id))
        self._tasks[instance_id] = task
        task.add_done_callback(lambda t: self._done(instance_id, t))

    def _done(self, instance_id: str, task: asyncio.Task[Fetched]) -> None:
        self._tasks.pop(instance_id, None)
        if task.cancelled():
            self._again.discard(instance_id)
            return
        if task.exception() is not None:
            log.warning("prefix-cache snapshot of %s not applied: %r", instance_id, task.exception())
        if instance_id in self._again:
            self._again.discard(instance_id)
            self.want(instance_id)

    async def close(self) -> None:
        """Cancel the fetches under way (and start no more)."""
        self.bus = None
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
