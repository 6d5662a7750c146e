"""The common frame of a Gantry placement service: FastStream app, Redis store, snapshot feed.

A service declares its JetStream consumers, subscribes its feed to the cluster events it needs, loads
the snapshot from Redis once at start, and only then lets its pipeline handlers run (they wait on
``ready``).

Every message of a pulled batch is decoded on its own (an undecodable one is dead-lettered and terminated
alone); the decoded ones are handled as one batch, with poison isolation (``shared.host.isolation``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import msgspec
from faststream import FastStream
from nats.aio.msg import Msg

from shared.bus import subjects
from shared.bus.exhausted import watch_exhausted
from shared.bus.messages import (
    CordonEvent,
    ErrorEvent,
    Heartbeat,
    InstanceEvents,
    MessageError,
    ModelFileUpdate,
    WorkerRegisteredEvent,
    WorkerRemovedEvent,
    decode,
)
from shared.bus.pull import PullHandler, pull_loop
from shared.bus.runtime import (
    Bus,
    RawHandler,
    ReportHandler,
    await_provisioned,
    listen,
    listen_reports,
    make_broker,
    nats_client,
    nats_options,
)
from shared.bus.streams import ALL_CONSUMERS, stream_limits
from shared.core.placement.profile import DEFAULT_PROFILE, Profile
from shared.core.placement.registry import profile_from_json, profile_from_yaml
from shared.core.placement.snapshot import ClusterSnapshot, SnapshotConfig
from shared.host.broker import PromptNatsBroker
from shared.host.contract import Consumes, Contract, Emits, merge, subject_matches
from shared.host.feed import Feed, SnapshotFeed
from shared.host.isolation import SplitBatch, ack_all, guarded, isolating, run_batch, settle, transient
from shared.host.metrics import ServiceMetrics, requested_times
from shared.host.tasks import cancel_until_done
from shared.host.throttle import PerKeyThrottle
from shared.settings import Settings, load_settings_or_exit
from shared.state.store import StateStore

log = logging.getLogger("gantry.service")
APP_LOG = logging.getLogger("gantry.app")  # start and stop of the app (INFO), through the root handler
REREAD_TIMEOUT_S = 2.0  # a read of an unknown worker's stored inventory gives up after this (Redis not answering)
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
    # The host observes the placement SLI when a batch of this service's stage is handled; the reconciler
    # observes it itself, at the commit (not every scored replica is committed).
    observes_stage: ClassVar[bool] = True
    # False: the bus does not deliver this service's own publishes back to it, so a service that publishes the
    # events its snapshot follows applies them to its feed itself (the reconciler: most instance events).
    hears_itself: ClassVar[bool] = True

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        # A broker whose stop ends within ~1.5 s, whether NATS answers, is gone or has stopped answering.
        self.broker = make_broker(settings, no_echo=not self.hears_itself, kind=PromptNatsBroker)
        # FastStream's own app logger always writes ANSI colour codes, into log files too: ours is plain.
        self.app = FastStream(self.broker, logger=APP_LOG)
        self.snapshot = ClusterSnapshot(
            SnapshotConfig(
                heartbeat_interval=settings.heartbeat_interval_s, not_ready_after=settings.not_ready_after_s
            )
        )
        self.feed = SnapshotFeed(self.snapshot)
        self.store = StateStore.from_url(settings.redis_url)
        self.ready = asyncio.Event()
        self.profile = load_profile(settings.profile)
        self.metrics = ServiceMetrics(self.name)
        self._bus: Bus | None = None
        self._pulls: list[tuple[str, str, str, PullHandler, float]] = []
        self._listens: list[tuple[str, str, RawHandler]] = []
        self._reports: list[tuple[str, str, ReportHandler]] = []
        self._loops: set[asyncio.Task[None]] = set()
        self._rereads = PerKeyThrottle(2.0)  # reads of the stored inventory per unknown worker heard from
        self._reading: dict[str, asyncio.Future[None]] = {}  # worker -> its read in flight (at most one each)
        self.app.on_startup(self._declare)
        self.app.after_startup(self._load)
        self.app_stopping = False  # set first thing at shutdown: background loops check it
        self.app.on_shutdown(self._mark_stopping)
        self.app.on_shutdown(self._stop_pull_loops)
        self.app.on_shutdown(self.store.close)
        self.app.on_shutdown(self._close_metrics)
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
            Consumes(subjects.EVENT_WORKER_REGISTERED, WorkerRegisteredEvent,
                     "worker inventories as stored, into this replica's snapshot"),
            Consumes(subjects.HEARTBEAT, Heartbeat, "worker liveness and usage, into this replica's snapshot"),
            Consumes(subjects.EVENT_CORDON, CordonEvent, "cordon changes, into this replica's snapshot"),
            Consumes(subjects.EVENT_WORKER_REMOVED, WorkerRemovedEvent, "workers that left: out of the snapshot"),
        ]
        if Feed.FILES in wanted:
            out.append(Consumes(subjects.MODEL_FILE, ModelFileUpdate, "model-file readiness, into the snapshot"))
        if Feed.CLAIMS in wanted:
            subject = subjects.EVENT_INSTANCE_ALL if Feed.PROGRESS in wanted else subjects.EVENT_INSTANCE
            out.append(Consumes(subject, InstanceEvents, "instance changes: what each GPU holds, replica counts"))
        return tuple(out)

    def _host_emits(self) -> tuple[Emits, ...]:
        # No sync requests: one makes every worker register again, so only the state writer (the reconciler, which
        # stores registrations) may send them (ops.auth derives the bus rights from this). A snapshot that misses a
        # worker reads its stored inventory instead (``_reread``).
        return (Emits(subjects.dead_letter(self.name), ErrorEvent, "a message this service rejected, and why"),)

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
            self._bus = Bus(
                nats_client(self.broker), self.name, declared=self.contract().emit_check(),
                on_dead_letter=self.metrics.dead_letter, stream_bytes=stream_limits(self.settings),
                storage=self.settings.js_storage,
            )
        return self._bus

    async def _declare(self) -> None:
        import nats

        nc = await nats.connect(self.settings.nats_url, **nats_options(self.settings))
        try:
            # With an identity the launcher provisioned the streams and consumers (this identity may only read
            # them). Without (a bus without auth) services declare what is missing, every consumer and not only
            # ours: interest-retention streams drop what no consumer wants yet.
            declare = not self.settings.identity
            consumers = ALL_CONSUMERS if declare else self.consumers()
            await await_provisioned(nc, self.settings, consumers, declare=declare, service=self.name)
        finally:
            await nc.close()

    async def _load(self) -> None:
        self.metrics.serve(self.settings.metrics_port, self.settings.metrics_host)
        nc = nats_client(self.broker)
        for subject, queue, on_raw in self._listens:
            await listen(nc, subject, on_raw, queue)
        for subject, queue, on_report in self._reports:
            await listen_reports(nc, subject, on_report, queue)
        # Subscribed before loading: an inventory stored after the load is announced to us. One stored before is
        # loaded; one never stored (the writer was away) is the writer's to ask for (it asks every worker at start).
        # The flush (a round trip) makes the server hold our subscriptions before we read Redis: nats-py only queues
        # them, and an announcement the server routes before it holds them reaches no one (a worker stored then
        # would be missing until its next heartbeat's re-read).
        await nc.flush()
        await self.feed.load(self.store)
        self.ready.set()
        await self.started()
        for stream, durable, subject, handler, linger in self._pulls:
            await watch_exhausted(nc, stream, durable, self._exhausted)
            # the arrivals behind a long batch are kept in progress as the batch itself is (``isolation``)
            loop = pull_loop(nc, stream, durable, subject, self.settings.batch_max, handler, linger,
                             keep_every=self.settings.ack_wait_s / 4)
            task = asyncio.ensure_future(loop)
            self._loops.add(task)
        log.info("%s ready: %d workers, %d instances", self.name, len(self.snapshot), len(self.feed.instances))
        # Everything alive now (modules, the loaded snapshot) lives as long as the process: keep the
        # collector from rescanning it. A full collection over it stalls the event loop for 50-150 ms.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)

    async def _exhausted(self, subject: str, data: bytes, deliveries: int) -> None:
        """A message one of this service's consumers gave up on without the host's last-delivery verdict (killed at
        each delivery, acks lost): dead-lettered, so it does not vanish unseen."""
        with contextlib.suppress(Exception):  # NATS away: the advisory is gone with it, as the message was already
            await self.bus.dead_letter(subject, f"no delivery of {deliveries} was acknowledged (the consumer gave up "
                                                "on it: the service died or lost NATS while handling it)", data)

    async def _mark_stopping(self) -> None:
        self.app_stopping = True

    async def _close_metrics(self) -> None:
        self.metrics.close()

    async def _stop_pull_loops(self) -> None:
        # The pull loops are our own tasks: the broker's drain waits on them forever unless they stop first.
        await cancel_until_done(self._loops)
        self._loops.clear()

    def pull(self, stream: str, durable: str, subject: str, handler: PullHandler, linger: float = 0.0) -> None:
        """Consume a pre-declared durable pull consumer with ``handler`` once the snapshot is loaded
        (``linger``: see ``pull_loop``). A batch the handler fails on is handed to it again one message at a
        time (``isolating``). The consumer must be declared in ``consumes``."""
        declared = [c for c in self.contract().consumes if (c.stream, c.durable) == (stream, durable)]
        if not any(subject_matches(subject, c.subject) for c in declared):
            raise ValueError(f"{self.name}: consumer {stream}/{durable} on {subject} is not declared in its contract")
        counted = self._counted(durable, subject, isolating(self, subject, handler))
        self._pulls.append((stream, durable, subject, counted, linger))

    def _counted(self, durable: str, subject: str, handler: PullHandler) -> PullHandler:
        """``handler`` with its batches counted: messages per subject, batch size, the consumer's backlog."""
        metrics = self.metrics

        async def handle(raws: list[Msg]) -> None:
            if raws:
                try:
                    backlog: int | None = raws[-1].metadata.num_pending
                except Exception:  # a message without JetStream metadata (never from a pull consumer)
                    backlog = None
                metrics.batch_pulled(durable, subject, len(raws), backlog)
            await handler(raws)

        return handle

    def listen(self, subject: str, handler: RawHandler, queue: str = "") -> None:
        """Hand every core-NATS message on ``subject`` (raw bytes) to ``handler``, from the snapshot load on.
        The subject (and queue group) must be declared in ``consumes``."""
        if not self.contract().consumed(subject, queue=queue):
            raise ValueError(f"{self.name}: {subject} (queue {queue!r}) is not declared in its contract")
        self._listens.append((subject, queue, handler))

    def listen_reports(self, subject: str, handler: ReportHandler, queue: str = "") -> None:
        """Like ``listen`` for worker reports: ``handler`` also gets the worker the subject speaks for (the
        identity the bus let publish there), to drop a report whose payload names another worker."""
        if not self.contract().consumed(subject, queue=queue):
            raise ValueError(f"{self.name}: {subject} (queue {queue!r}) is not declared in its contract")

        async def on_report(body: bytes, concrete: str) -> None:
            await handler(body, subjects.reporting_worker(concrete))

        self._reports.append((subject, queue, on_report))

    def wire_feed(self) -> None:
        """Subscribe the snapshot feed to worker reports and cluster events (fan-out, no queue)."""
        feed = self.feed

        # Inventories as the state writer stored them (it alone checks a registration against the ledger).
        async def on_registered(body: bytes) -> None:
            ev = self._quiet_decode(body, WorkerRegisteredEvent)
            if ev is not None:
                feed.on_registered(ev, self.clock())

        # A report whose payload names another worker than its subject is forged: dropped here, dead-lettered
        # once by the state writer.

        async def on_heartbeat(body: bytes, sender: str) -> None:
            hb = self._quiet_decode(body, Heartbeat)
            if hb is None or hb.worker != sender:
                return
            if feed.on_heartbeat(hb, self.clock()) and hb.worker not in feed.inventory and hb.worker not in (
                    reading := self._reading):
                # read beside the feed, not in it: awaited here, a Redis that took the read and never answered
                # held every later heartbeat of every worker (all NOT_READY 15 s later, nothing placed)
                reading[hb.worker] = task = asyncio.ensure_future(self._reread_then(hb))
                task.add_done_callback(functools.partial(_forget, reading, hb.worker))

        async def on_file(body: bytes, sender: str) -> None:
            upd = self._quiet_decode(body, ModelFileUpdate)
            if upd is not None and upd.worker == sender:
                feed.on_file(upd)

        async def on_cordon(body: bytes) -> None:
            ev = self._quiet_decode(body, CordonEvent)
            if ev is not None:
                feed.on_cordon(ev)

        async def on_worker_removed(body: bytes) -> None:
            ev = self._quiet_decode(body, WorkerRemovedEvent)
            if ev is not None:
                feed.on_worker_removed(ev.worker)

        wanted = self.feeds()
        self.listen(subjects.EVENT_WORKER_REGISTERED, on_registered)
        self.listen_reports(subjects.HEARTBEAT, on_heartbeat)
        self.listen(subjects.EVENT_CORDON, on_cordon)
        self.listen(subjects.EVENT_WORKER_REMOVED, on_worker_removed)
        if Feed.FILES in wanted:
            self.listen_reports(subjects.MODEL_FILE, on_file)
        if Feed.CLAIMS in wanted:

            async def on_instance(body: bytes) -> None:
                batch = self._quiet_decode(body, InstanceEvents)
                if batch is not None:
                    feed.on_instances(batch.events)

            # One subscription for both instance subjects: their order between themselves is kept.
            both = Feed.PROGRESS in wanted
            self.listen(subjects.EVENT_INSTANCE_ALL if both else subjects.EVENT_INSTANCE, on_instance)

    async def _reread_then(self, hb: Heartbeat) -> None:
        """``_reread`` the heartbeat's worker, then apply the heartbeat if the snapshot holds the worker now."""
        if await self._reread(hb.worker):
            self.feed.on_heartbeat(hb, self.clock())

    async def _reread(self, worker: str) -> bool:
        """A heartbeat from a worker this snapshot does not hold: its announcement was missed (e.g. while NATS
        reconnected), or it is not stored yet (the state writer then asks it to register, and its announcement
        follows). Take its stored inventory, as ``feed.load`` does, at most once every 2 s per worker; True if
        the snapshot holds it now."""
        if not self._rereads.allow(worker, self.clock()):
            return False
        removals = self.feed.removals
        try:
            revision, stored = await asyncio.wait_for(self.store.stored_inventory(worker), REREAD_TIMEOUT_S)
        except Exception as exc:  # Redis away: the worker's next periodic registration is announced anyway
            log.warning("cannot read the stored inventory of %s: %s", worker, exc)
            return False
        # A removal heard during the read may be this worker's, deleted after we read it (removals carry no
        # revision): the record is then stale and must not bring it back. The next heartbeat reads again.
        if stored is None or self.feed.removals != removals:
            return False
        self.feed.on_registered(WorkerRegisteredEvent(worker=stored, revision=revision), self.clock(), read=True)
        return worker in self.feed.inventory

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
        if not batch:
            return
        msgs = [r for _, r in batch]
        if await guarded(self, subject, msgs, lambda: work([m for m, _ in batch])):
            if self.observes_stage:
                now = self.clock()
                for message, _ in batch:
                    self.metrics.stage_done(requested_times(message), now)
            await ack_all(msgs)


def serve(factory: Callable[[Settings], PlacementService]) -> None:
    """Run one service replica until stopped, on uvloop (its I/O loop costs a fraction of asyncio's)."""
    import uvloop

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    APP_LOG.setLevel(logging.INFO)
    uvloop.run(_run_then_settle(factory(load_settings_or_exit(_prog()))))


def _prog() -> str:
    """How the running service was started, for its error lines (``python -m services.filter``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = spec.name.removesuffix(".__main__") if spec is not None else ""
    return f"python -m {name}" if name else os.path.basename(sys.argv[0]) or "gantry service"


SETTLE_S = 2.0  # how long background tasks get to finish their cancellation at shutdown


async def _run_then_settle(service: PlacementService) -> None:
    """Run the app; once it has shut down (or failed to), cancel what is left with a bound.

    A background task (tick, flush, feed) whose client library turns a cancellation into its own error can
    ignore it and loop; the event loop's close would then wait forever. Such a task is named in the log and
    the process exits anyway: its shutdown hooks have run, so nothing is left unacked or unflushed.
    """
    try:
        await service.app.run()
    finally:
        # Also when the shutdown failed: asyncio.run's own cancellation of what is left waits without a bound.
        me = asyncio.current_task()
        rest = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        stuck = await cancel_until_done(rest, timeout=SETTLE_S)
        if stuck:
            log.error("shutdown: %d task(s) ignored cancellation: %s", len(stuck),
                      ", ".join(sorted(t.get_coro().__qualname__ for t in stuck)))  # type: ignore[union-attr]
            failed = sys.exc_info()[0] is not None  # the shutdown raised: log why, exit 1 as the raise would
            if failed:
                log.error("shutdown failed", exc_info=True)
            logging.shutdown()
            os._exit(1 if failed else 0)


def load_profile(name: str) -> Profile:
    """The placement profile: ``default``, or a JSON/YAML file path."""
    if name in ("", "default"):
        return DEFAULT_PROFILE
    path = Path(name)
    data = path.read_bytes()
    return profile_from_yaml(data) if path.suffix in (".yaml", ".yml") else profile_from_json(data)


__all__ = [
    "PlacementService",
    "SplitBatch",
    "ack_all",
    "guarded",
    "isolating",
    "load_profile",
    "run_batch",
    "serve",
    "settle",
    "transient",
]


def _forget(reading: dict[str, asyncio.Future[None]], worker: str, _done: object) -> None:
    """A worker's read is over (done, failed or cancelled): the next unknown heartbeat may read again."""
    reading.pop(worker, None)
