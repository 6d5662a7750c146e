"""The common frame of a Gantry placement service: FastStream app, Redis store, snapshot feed.

A service declares its JetStream consumers, subscribes its feed to the cluster events it needs, loads
the snapshot from Redis once at start, and only then lets its pipeline handlers run (they wait on
``ready``).

Poison isolation: every message of a pulled batch is decoded on its own (an undecodable one is
dead-lettered and terminated alone), and the decoded ones are handled as one batch for speed. If handling
the batch raises, the batch is handled again one message at a time, so whatever one message raises
(KeyError, IndexError, OverflowError, RecursionError, anything) it alone is dead-lettered with the reason
and terminated, while the others are handled and acked. Only a failure of the infrastructure itself (NATS or
Redis away, a busy lock: ``transient``) sends messages back for a later redelivery, a bounded number of
times.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import msgspec
import nats.errors
import nats.js.errors
import redis.exceptions
from faststream import FastStream
from nats.aio.msg import Msg

from shared.bus import subjects
from shared.bus.messages import (
    CordonEvent,
    ErrorEvent,
    Heartbeat,
    InstanceEvents,
    MessageError,
    ModelFileUpdate,
    SyncRequest,
    WorkerRegistration,
    decode,
)
from shared.bus.runtime import Bus, PullHandler, RawHandler, listen, make_broker, nats_client, prepare, pull_loop
from shared.bus.streams import ALL_CONSUMERS
from shared.core.placement.profile import DEFAULT_PROFILE, Profile
from shared.core.placement.registry import profile_from_json, profile_from_yaml
from shared.core.placement.snapshot import ClusterSnapshot, SnapshotConfig
from shared.host.contract import Consumes, Contract, Emits, merge, subject_matches
from shared.host.feed import Feed, SnapshotFeed
from shared.settings import Settings, load_settings
from shared.state.store import StateStore

log = logging.getLogger("gantry.service")
T = TypeVar("T", bound=msgspec.Struct)
# Young-generation collections every 10,000 allocations instead of 700: each decision allocates
# thousands of short-lived objects, and collecting them 15x less often costs no memory worth counting.
GC_THRESHOLDS = (10_000, 20, 20)


class PlacementService:
    """Shared wiring; subclasses declare what they consume and emit (``consumes``, ``emits``: the contract,
    see ``shared.host.contract``) and add their pipeline subscribers in ``register``."""

    name = "service"
    description: ClassVar[str] = ""
    consumes: ClassVar[tuple[Consumes, ...]] = ()
    emits: ClassVar[tuple[Emits, ...]] = ()

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self.broker = make_broker(settings)
        self.app = FastStream(self.broker)
        self.snapshot = ClusterSnapshot(
            SnapshotConfig(
                heartbeat_interval=settings.heartbeat_interval_s, not_ready_after=settings.not_ready_after_s
            )
        )
        self.feed = SnapshotFeed(self.snapshot)
        self.store = StateStore.from_url(settings.redis_url)
        self.ready = asyncio.Event()
        self.profile = load_profile(settings.profile)
        self._bus: Bus | None = None
        self._pulls: list[tuple[str, str, str, PullHandler, float]] = []
        self._listens: list[tuple[str, str, RawHandler]] = []
        self._loops: set[asyncio.Task[None]] = set()
        self._asked: dict[str, float] = {}
        self.app.on_startup(self._declare)
        self.app.after_startup(self._load)
        self.app.on_shutdown(self._stop_pull_loops)
        self.app.on_shutdown(self.store.close)
        self.wire_feed()
        self.register()

    # -- the contract ---------------------------------------------------------------------------------

    def contract(self) -> Contract:
        """Everything this service consumes and emits: its own declarations and the host's (the snapshot
        feed's subscriptions, sync requests, dead letters)."""
        return Contract(
            service=self.name,
            description=self.description or (type(self).__doc__ or "").strip(),
            consumes=merge(self.consumes, self._feed_consumes()),
            emits=merge(self.emits, self._host_emits()),
        )

    def _feed_consumes(self) -> tuple[Consumes, ...]:
        wanted = self.feeds()
        out = [
            Consumes(subjects.REGISTER, WorkerRegistration, "worker inventories, into this replica's snapshot"),
            Consumes(subjects.HEARTBEAT, Heartbeat, "worker liveness and usage, into this replica's snapshot"),
            Consumes(subjects.EVENT_CORDON, CordonEvent, "cordon changes, into this replica's snapshot"),
        ]
        if Feed.FILES in wanted:
            out.append(Consumes(subjects.MODEL_FILE, ModelFileUpdate, "model-file readiness, into the snapshot"))
        if Feed.CLAIMS in wanted:
            subject = subjects.EVENT_INSTANCE_ALL if Feed.PROGRESS in wanted else subjects.EVENT_INSTANCE
            out.append(Consumes(subject, InstanceEvents, "instance changes: what each GPU holds, replica counts"))
        return tuple(out)

    def _host_emits(self) -> tuple[Emits, ...]:
        return (
            Emits(subjects.SYNC, SyncRequest, "asks workers (one, or all at start) to register again"),
            Emits(subjects.dead_letter(self.name), ErrorEvent, "a message this service rejected, and why"),
        )

    # -- to override ----------------------------------------------------------------------------------

    def consumers(self) -> Sequence[tuple[str, str, str]]:
        """(stream, durable, subject) of the JetStream consumers this service reads."""
        return ()

    def register(self) -> None:
        """Add the service's own subscribers."""

    def feeds(self) -> Feed:
        """The cluster events this service's snapshot follows (all of them unless narrowed)."""
        return Feed.ALL

    async def started(self) -> None:
        """Called once the snapshot is loaded and handlers may run."""

    # -- wiring ---------------------------------------------------------------------------------------

    @property
    def bus(self) -> Bus:
        """Publishing side (available once the broker is connected)."""
        if self._bus is None:
            self._bus = Bus(nats_client(self.broker), self.name, declared=self.contract().emit_check())
        return self._bus

    async def _declare(self) -> None:
        import nats

        nc = await nats.connect(self.settings.nats_url)
        try:
            # Every consumer, not only ours: interest-retention streams drop what no consumer wants yet.
            await prepare(nc, self.settings, ALL_CONSUMERS)
        finally:
            await nc.close()

    async def _load(self) -> None:
        nc = nats_client(self.broker)
        for subject, queue, on_raw in self._listens:
            await listen(nc, subject, on_raw, queue)
        await self.feed.load(self.store)
        # Workers that registered before we subscribed are in Redis only if the writer saw them: ask all
        # to register again so no worker is missing from this snapshot.
        await self.bus.publish(subjects.SYNC, SyncRequest())
        self.ready.set()
        await self.started()
        for stream, durable, subject, handler, linger in self._pulls:
            loop = pull_loop(nc, stream, durable, subject, self.settings.batch_max, handler, linger)
            task = asyncio.ensure_future(loop)
            self._loops.add(task)
        log.info("%s ready: %d workers, %d instances", self.name, len(self.snapshot), len(self.feed.instances))
        # Everything alive now (modules, the loaded snapshot) lives as long as the process: keep the
        # collector from rescanning it. A full collection over it stalls the event loop for 50-150 ms.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)

    async def _stop_pull_loops(self) -> None:
        # The pull loops are our own tasks: the broker's drain waits on them forever unless they stop first.
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops.clear()

    def pull(self, stream: str, durable: str, subject: str, handler: PullHandler, linger: float = 0.0) -> None:
        """Consume a pre-declared durable pull consumer with ``handler`` once the snapshot is loaded
        (``linger``: see ``pull_loop``). A batch the handler fails on is handed to it again one message at a
        time (``isolating``). The consumer must be declared in ``consumes``."""
        declared = [c for c in self.contract().consumes if (c.stream, c.durable) == (stream, durable)]
        if not any(subject_matches(subject, c.subject) for c in declared):
            raise ValueError(f"{self.name}: consumer {stream}/{durable} on {subject} is not declared in its contract")
        self._pulls.append((stream, durable, subject, isolating(self, subject, handler), linger))

    def listen(self, subject: str, handler: RawHandler, queue: str = "") -> None:
        """Hand every core-NATS message on ``subject`` (raw bytes) to ``handler``, from the snapshot load on.
        The subject (and queue group) must be declared in ``consumes``."""
        if not self.contract().consumed(subject, queue=queue):
            raise ValueError(f"{self.name}: {subject} (queue {queue!r}) is not declared in its contract")
        self._listens.append((subject, queue, handler))

    def wire_feed(self) -> None:
        """Subscribe the snapshot feed to worker reports and cluster events (fan-out, no queue)."""
        feed = self.feed

        async def on_register(body: bytes) -> None:
            reg = self._quiet_decode(body, WorkerRegistration)
            if reg is not None:
                feed.on_register(reg, self.clock())

        async def on_heartbeat(body: bytes) -> None:
            hb = self._quiet_decode(body, Heartbeat)
            if hb is not None and feed.on_heartbeat(hb, self.clock()) and hb.worker not in feed.inventory:
                await self._ask_to_register(hb.worker)

        async def on_file(body: bytes) -> None:
            upd = self._quiet_decode(body, ModelFileUpdate)
            if upd is not None:
                feed.on_file(upd)

        async def on_cordon(body: bytes) -> None:
            ev = self._quiet_decode(body, CordonEvent)
            if ev is not None:
                feed.on_cordon(ev)

        wanted = self.feeds()
        self.listen(subjects.REGISTER, on_register)
        self.listen(subjects.HEARTBEAT, on_heartbeat)
        self.listen(subjects.EVENT_CORDON, on_cordon)
        if Feed.FILES in wanted:
            self.listen(subjects.MODEL_FILE, on_file)
        if Feed.CLAIMS in wanted:

            async def on_instance(body: bytes) -> None:
                batch = self._quiet_decode(body, InstanceEvents)
                if batch is not None:
                    for ev in batch.events:
                        feed.on_instance(ev)

            # One subscription for both instance subjects: their order between themselves is kept.
            both = Feed.PROGRESS in wanted
            self.listen(subjects.EVENT_INSTANCE_ALL if both else subjects.EVENT_INSTANCE, on_instance)

    async def _ask_to_register(self, worker: str) -> None:
        now = self.clock()
        if now - self._asked.get(worker, float("-inf")) >= 2.0:
            self._asked[worker] = now
            await self.bus.publish(subjects.SYNC, SyncRequest(worker=worker))

    @staticmethod
    def _quiet_decode(body: bytes, kind: type[T]) -> T | None:
        # Feed input is validated (and dead-lettered) once, by the reconciler's state writer.
        try:
            return decode(body, kind)
        except MessageError:
            return None

    # -- helpers for pipeline handlers ----------------------------------------------------------------

    async def decode_batch(self, raws: list[Msg], kind: type[T], subject: str) -> list[tuple[T, Msg]]:
        """Decode each message of a pulled batch on its own; dead-letter and terminate the undecodable ones,
        return the rest."""
        out: list[tuple[T, Msg]] = []
        for raw in raws:
            try:
                msg = await self.bus.decode_or_reject(subject, raw.data, kind)
            except Exception as exc:  # never expected (decode reports everything as MessageError): still isolate
                await settle(self, subject, [raw], exc)
                continue
            if msg is None:
                await raw.term()
            else:
                out.append((msg, raw))
        return out

    async def consume(
        self, raws: list[Msg], kind: type[T], subject: str, work: Callable[[list[T]], Awaitable[Any]]
    ) -> None:
        """Decode a batch, run ``work`` on the valid messages, ack them (see ``guarded`` for failures)."""
        batch = await self.decode_batch(raws, kind, subject)
        if batch:
            await run_batch(self, subject, [r for _, r in batch], lambda: work([m for m, _ in batch]))


class SplitBatch(Exception):
    """Handling a batch of several messages failed on something other than the infrastructure: the pull
    loop's ``isolating`` wrapper hands the batch's messages to the handler again one at a time."""


# Failures of the infrastructure, not of a message: NATS or Redis away or busy, a lock not obtained in time
# (builtin TimeoutError and ConnectionError are OSErrors). Anything else a handler raises is the message's.
TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.FlushTimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.NoServersError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.TimeoutError,
    nats.js.errors.ServiceUnavailableError,
)
_TRANSIENT_REDIS_REPLIES = ("BUSY", "LOADING", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN")


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of NATS or Redis (retry later) rather than of the message handled."""
    if isinstance(exc, TRANSIENT):
        return True
    return isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith(_TRANSIENT_REDIS_REPLIES)


def failure_reason(exc: BaseException) -> str:
    """One line for a dead letter: the exception's type and message (bounded)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:400]}" if text else type(exc).__name__


async def settle(service: PlacementService, subject: str, raws: Sequence[Msg], exc: BaseException) -> None:
    """Decide the fate of messages whose handling raised ``exc``.

    A transient failure: nak with a delay, so JetStream redelivers them (past ``max_deliver`` deliveries
    they are dead-lettered and terminated instead). Anything else: the messages are poison, dead-lettered
    with the reason and terminated (callers pass a single message unless the failure is transient).
    """
    for raw in raws:
        if raw.is_acked:
            continue
        if transient(exc):
            meta = raw.metadata
            if meta.num_delivered is None or meta.num_delivered < service.settings.max_deliver:
                await raw.nak(delay=service.settings.ack_wait_s)
                continue
            reason = f"gave up after {meta.num_delivered} deliveries: {failure_reason(exc)}"
        else:
            reason = f"handling failed: {failure_reason(exc)}"
        await service.bus.dead_letter(subject, reason, raw.data)
        await raw.term()


async def ack_all(raws: Sequence[Msg]) -> None:
    """Ack every message of a handled batch (those not already acked or terminated)."""
    for raw in raws:  # an ack only queues bytes for the connection's flusher: no task per ack needed
        if not raw.is_acked:
            await raw.ack()


async def guarded(
    service: PlacementService, subject: str, raws: Sequence[Msg], work: Callable[[], Awaitable[Any]]
) -> bool:
    """Run the work of ``raws``; True if it succeeded (the caller acks).

    On a transient failure (NATS or Redis away) the messages are nak'ed with a delay (``settle``), and the
    consumer keeps running. On any other failure a lone message is dead-lettered and terminated; for
    several, ``SplitBatch`` is raised so that ``isolating`` handles each message again on its own.
    """
    try:
        await work()
        return True
    except Exception as exc:
        if len(raws) > 1 and not transient(exc):
            log.warning("%s failed a batch of %d on %s (%s): handling each alone", service.name, len(raws),
                        subject, failure_reason(exc))
            raise SplitBatch(failure_reason(exc)) from exc
        log.exception("%s failed on %s", service.name, subject)
        await settle(service, subject, raws, exc)
        return False


async def run_batch(
    service: PlacementService, subject: str, raws: Sequence[Msg], work: Callable[[], Awaitable[Any]]
) -> None:
    """``guarded`` then ack the whole batch on success."""
    if await guarded(service, subject, raws, work):
        await ack_all(raws)


def isolating(service: PlacementService, subject: str, handler: PullHandler) -> PullHandler:
    """``handler`` for pulled batches, with poison isolation: if it fails on a batch of several messages
    (``SplitBatch``, or anything it let escape), each message it has not settled yet is handed to it again on
    its own; whatever a lone message still raises settles that message alone (``settle``)."""

    async def handle(raws: list[Msg]) -> None:
        try:
            await handler(raws)
            return
        except Exception as exc:
            if len(raws) == 1:
                await _settle_escaped(service, subject, raws[0], exc)
                return
            if transient(exc):  # NATS or Redis away: every message would fail alone too; retry them later
                log.warning("%s: a batch on %s failed: %s", service.name, subject, failure_reason(exc))
                await settle(service, subject, raws, exc)
                return
            if not isinstance(exc, SplitBatch):
                log.warning("%s: a batch on %s raised %s: handling each message alone", service.name, subject,
                            failure_reason(exc))
        for raw in raws:
            if raw.is_acked:
                continue  # handled before the failure (acked), or settled already (dead-lettered)
            try:
                await handler([raw])
            except Exception as exc:
                await _settle_escaped(service, subject, raw, exc)

    return handle


async def _settle_escaped(service: PlacementService, subject: str, raw: Msg, exc: BaseException) -> None:
    cause = exc.__cause__ if isinstance(exc, SplitBatch) and exc.__cause__ is not None else exc
    log.error("%s: a message on %s raised %s", service.name, subject, failure_reason(cause))
    await settle(service, subject, [raw], cause)


def serve(factory: Callable[[Settings], PlacementService]) -> None:
    """Run one service replica until stopped, on uvloop (its I/O loop costs a fraction of asyncio's)."""
    import uvloop

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvloop.run(factory(load_settings()).app.run())


def load_profile(name: str) -> Profile:
    """The placement profile: ``default``, or a JSON/YAML file path."""
    if name in ("", "default"):
        return DEFAULT_PROFILE
    path = Path(name)
    data = path.read_bytes()
    return profile_from_yaml(data) if path.suffix in (".yaml", ".yml") else profile_from_json(data)
