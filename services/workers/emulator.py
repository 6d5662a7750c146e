"""A fleet of emulated GPU workers in one asyncio process.

Each worker registers its inventory, heartbeats on core NATS (usage = what its instances claim), reports
model files READY after a download delay, and drives assigned (SCHEDULED) instances to STARTING, then RUNNING;
it reports DRAINING instances idle right away (an emulated server has no requests) and deletes instances
on command. One wildcard subscription serves every worker, so a thousand workers cost one connection.

With ``engines`` on, each instance gets a real emulated engine server (``services.workers.engines``): it is
RUNNING only once its server answers, ERROR when its server fails to start or dies, idle while DRAINING only
once its engine has nothing in flight, and its server is stopped when it is deleted or the fleet exits.
Off (the default), nothing of that is loaded or run.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from shared.bus import subjects
from shared.bus.messages import (
    AssignInstance,
    AssignInstances,
    DeleteInstance,
    DrainInstance,
    Heartbeat,
    InstanceReports,
    InstanceStatus,
    MessageError,
    ModelFileUpdate,
    SyncRequest,
    WorkerRegistration,
    decode,
    encode,
)
from shared.bus.runtime import js_publish
from shared.core.coalesce import AnswerWindow, Verdict
from shared.core.placement.domain import GIB, Gpu, GpuUsage, InstanceState, ModelFileState, Worker
from shared.host.disconnect import close_promptly

if TYPE_CHECKING:
    from services.workers.engines import EngineSupervisor

log = logging.getLogger("gantry.workers")
REPORT_RETRY_MAX_S = 2.0  # the longest pause between two attempts to store a status report
REPORT_WARN_AFTER = 20  # attempts (~33 s) before a report not yet stored is logged


@dataclass(frozen=True)
class FleetConfig:
    """Shape and timing of an emulated fleet."""

    count: int = 4
    prefix: str = "w"
    start_index: int = 0
    gpus: int = 8
    gpu_product: str = "H100-SXM-80GB"
    gpu_vendor: str = "cuda"
    vram_gib: float = 80.0
    ram_gib: float = 1024.0
    labels: dict[str, str] = field(default_factory=dict)
    cluster: str = "default"
    heartbeat_interval_s: float = 5.0
    register_every: int = 10  # heartbeats between full re-registrations
    # A worker answers sync requests by registering at most once per this many seconds (the first at once, the
    # ones within the window by one registration when it closes): any identity allowed to ask makes every worker
    # re-register with one message, so a flood must not cost a registration per message per worker. 2 s keeps a
    # restarted reconciler (which asks all at start) waiting at most that long for a worker that just registered,
    # well inside a heartbeat interval.
    sync_window_s: float = 2.0
    download_delay_s: float = 0.5
    start_delay_s: float = 0.2
    ready_files: tuple[str, ...] = ()  # model sources already on disk at start
    engines: bool = False  # run an emulated engine server per instance
    engine_nats_url: str | None = None  # the engine identity's NATS URL, handed to the servers
    engine_report_master: bytes | None = None  # derives each server's own report key (None: unsigned reports)
    engine_start_timeout_s: float = 30.0
    drain_settle_s: float = 1.0  # a drain younger than this is never idle (requests routed before it may arrive)
    engine_args: tuple[str, ...] = ()  # more engine server flags


@dataclass
class EmulatedInstance:
    """An instance as one emulated worker runs it."""

    id: str
    model: str
    source: str
    gpu_indexes: tuple[int, ...]
    vram_claims: tuple[int, ...]
    state: InstanceState = InstanceState.SCHEDULED


@dataclass
class EmulatedWorker:
    """One emulated worker's inventory and what it runs."""

    worker: Worker
    instances: dict[str, EmulatedInstance] = field(default_factory=dict)
    files: dict[str, ModelFileState] = field(default_factory=dict)
    seq: int = 0
    # Usage per GPU and instance ids as of the last heartbeat, until ``changed``: a worker packed with
    # hundreds of instances would otherwise sum and sort them all for every heartbeat.
    _usage: tuple[tuple[GpuUsage, ...], tuple[str, ...]] | None = field(default=None, repr=False)

    def changed(self) -> None:
        """Its instances were added or removed: the next heartbeat counts them again."""
        self._usage = None

    def heartbeat(self) -> Heartbeat:
        """Current usage: each GPU's VRAM is what the instances on it claim."""
        if self._usage is None:
            used = {g.index: 0 for g in self.worker.gpus}
            for inst in self.instances.values():
                for idx, claim in zip(inst.gpu_indexes, inst.vram_claims, strict=False):
                    if idx in used:
                        used[idx] += claim
            gpus = tuple(GpuUsage(index=i, vram_used=u) for i, u in used.items())
            self._usage = (gpus, tuple(sorted(self.instances)))
        self.seq += 1
        gpus, ids = self._usage
        return Heartbeat(worker=self.worker.name, seq=self.seq, ram_used=0, gpus=gpus, instances=ids)


def make_workers(cfg: FleetConfig) -> list[EmulatedWorker]:
    """The fleet's workers, named ``<prefix><n>``."""
    return [EmulatedWorker(worker=_worker(cfg, n), files=dict.fromkeys(cfg.ready_files, ModelFileState.READY))
            for n in range(cfg.start_index, cfg.start_index + cfg.count)]


def fleet_problem(cfg: FleetConfig) -> str | None:
    """Why the workers ``cfg`` describes would be refused where they register (the message schema's limits: name,
    labels, VRAM and RAM sizes), else None. Every heartbeat of such a worker would be dead-lettered; the first and
    the last worker stand for all (only their numbers differ, and the last has the longest name)."""
    for n in {cfg.start_index, cfg.start_index + max(cfg.count - 1, 0)}:
        worker = _worker(cfg, n)
        try:
            msgspec.convert(msgspec.to_builtins(worker), Worker)
        except msgspec.ValidationError as err:
            return f"worker {worker.name[:80]!r} would be refused: {err}"
    return None


def _worker(cfg: FleetConfig, n: int) -> Worker:
    gpus = tuple(Gpu(index=i, vendor=cfg.gpu_vendor, product=cfg.gpu_product, vram_total=int(cfg.vram_gib * GIB))
                 for i in range(cfg.gpus))
    return Worker(name=f"{cfg.prefix}{n}", cluster=cfg.cluster, labels=dict(cfg.labels), gpus=gpus,
                  ram_total=int(cfg.ram_gib * GIB))


class Fleet:
    """Runs emulated workers against a NATS server."""

    def __init__(self, cfg: FleetConfig, nc: Client) -> None:
        self.cfg = cfg
        self.nc = nc
        self.workers = {w.worker.name: w for w in make_workers(cfg)}
        self.paused: set[str] = set()  # workers whose heartbeats are suppressed
        self._tasks: set[asyncio.Task[None]] = set()
        self._draining: set[str] = set()  # instances whose engine is being watched until idle
        self._closing = False
        # per worker: reports made this moment, not sent yet, and the one future their makers wait on
        self._outbox: dict[str, tuple[list[InstanceStatus], asyncio.Future[None]]] = {}
        # (worker, source) -> set once a download under way is over (those needing the file wait on it)
        self._downloads: dict[tuple[str, str], asyncio.Event] = {}
        self.engines: EngineSupervisor | None = self._engines() if cfg.engines else None
        # per worker: when it last registered and whether a sync request waits for its next registration
        self._sync: dict[str, AnswerWindow] = {}

    def _engines(self) -> EngineSupervisor:
        # imported here: a fleet without engines (the placement benchmark's thousand workers) loads none of it
        from services.workers.engines import EngineOptions, EngineSupervisor

        opts = EngineOptions(nats_url=self.cfg.engine_nats_url, start_timeout_s=self.cfg.engine_start_timeout_s,
                             extra_args=self.cfg.engine_args, report_master=self.cfg.engine_report_master)
        return EngineSupervisor(opts, self._engine_exited)

    async def close(self) -> None:
        """Stop every engine server the fleet started (the fleet is exiting): first take no more commands and
        cancel the starts and drains under way, so that no server is started after the servers were listed."""
        self._closing = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.engines is not None:
            await self.engines.stop_all()

    async def start(self) -> None:
        """Subscribe to worker commands and register every worker."""
        # The command subjects the workers' contract declares (and the bus lets the fleet read), one each.
        for command in (subjects.worker_assign("*"), subjects.worker_drain("*"), subjects.worker_delete("*")):
            await self.nc.subscribe(command, cb=self._on_command)
        await self.nc.subscribe(subjects.SYNC, cb=self._on_sync)
        for w in self.workers.values():
            await self._register(w)
        await self.nc.flush()

    async def run(self) -> None:
        """Heartbeat forever, spreading the fleet's heartbeats over the interval."""
        await self.start()
        beat = 0
        while True:
            t0 = time.monotonic()
            names = list(self.workers)
            chunk = max(1, len(names) // 10)
            for i in range(0, len(names), chunk):
                await self._beat(names[i : i + chunk], register=beat % self.cfg.register_every == 0)
                await asyncio.sleep(self.cfg.heartbeat_interval_s / 10)
            beat += 1
            rest = self.cfg.heartbeat_interval_s - (time.monotonic() - t0)
            if rest > 0:
                await asyncio.sleep(rest)

    async def _beat(self, names: list[str], register: bool) -> None:
        for name in names:
            if name in self.paused:
                continue
            w = self.workers[name]
            if register:
                await self._register(w)
            await self.nc.publish(subjects.worker_heartbeat(w.worker.name), encode(w.heartbeat()))

    async def _on_sync(self, msg: Msg) -> None:
        # a stream's delivery keeps its own subject: one a client pointed here (a consumer's deliver subject, a pull's
        # reply) is not an ask, whatever its payload reads as
        if msg.subject != subjects.SYNC:
            return
        try:
            req = decode(msg.data, SyncRequest)
        except MessageError:
            return
        names = [req.worker] if req.worker else list(self.workers)
        now, later = time.monotonic(), []
        for name in names:
            w = self.workers.get(name)
            if w is None or name in self.paused:
                continue
            decision = self._window(name).ask(now)
            if decision.verdict is Verdict.NOW:
                await self._register(w)
            elif decision.verdict is Verdict.LATER:
                later.append((decision.at, name))
        if later:
            self._spawn(self._register_when_due(sorted(later)))

    async def _register_when_due(self, due: list[tuple[float, str]]) -> None:
        """Register each worker once its sync window closes, unless it registered since (that answered)."""
        for at, name in due:
            wait = at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            w = self.workers.get(name)
            if w is not None and name not in self.paused and self._window(name).due(time.monotonic()):
                await self._register(w)

    def _window(self, name: str) -> AnswerWindow:
        window = self._sync.get(name)
        if window is None:
            window = self._sync[name] = AnswerWindow(self.cfg.sync_window_s)
        return window

    async def _register(self, w: EmulatedWorker) -> None:
        await self.nc.publish(subjects.worker_register(w.worker.name), encode(WorkerRegistration(worker=w.worker)))
        # any registration (at start, periodic, asked for) answers the sync requests that came before it
        self._window(w.worker.name).answered(time.monotonic())

    async def _on_command(self, msg: Msg) -> None:
        parts = msg.subject.split(".")
        name, verb = parts[-2], parts[-1]
        w = self.workers.get(name)
        if w is None or name in self.paused or self._closing:
            return
        try:
            if verb == "assign":
                self._assign_all(w, _assignments(msg.data))
            elif verb == "drain":
                self._spawn(self._drain(w, decode(msg.data, DrainInstance)))
            elif verb == "delete":
                self._spawn(self._delete(w, decode(msg.data, DeleteInstance)))
        except MessageError as exc:
            log.warning("worker %s ignored a bad %s command: %s", name, verb, exc)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _report(self, w: EmulatedWorker, reports: list[InstanceStatus]) -> None:
        """Report on instances; returns once the reports are stored (or given up on). Reports a worker makes
        at the same moment (instances assigned together reach STARTING together) travel as one message."""
        box = self._outbox.get(w.worker.name)
        if box is None:  # the first of this moment's reports: send them all once the moment is over
            loop = asyncio.get_running_loop()
            box = self._outbox[w.worker.name] = ([], loop.create_future())
            loop.call_soon(self._spawn, self._send_reports(w.worker.name))
        box[0].extend(reports)
        await box[1]

    async def _send_reports(self, worker: str) -> None:
        box = self._outbox.pop(worker, None)
        if box is None:
            return
        reports, done = tuple(box[0]), box[1]
        tags = [f"{m.instance_id}:{_tag(m)}" for m in reports]
        # Named by content: a re-send after a lost acknowledgement is dropped by the stream's duplicate window.
        msg_id = f"{worker}:" + hashlib.blake2b("|".join(tags).encode(), digest_size=12).hexdigest()
        payload = encode(InstanceReports(reports=reports))
        try:
            # A status must get through: retried (deduped) while NATS or the stream is busy or away, for as long as
            # it takes. Dropped after ~33 s, a lost STARTING or RUNNING left the replica SCHEDULED in the store for
            # good, holding its GPU, while the worker ran it (heartbeats name instances, not their states). The
            # instance's next report waits behind this one, so they are stored in order.
            attempt = 0
            while True:
                try:
                    await js_publish(self.nc, subjects.instance_status(worker), payload, msg_id, timeout=2.0)
                    if attempt >= REPORT_WARN_AFTER:
                        log.warning("worker %s reported %s after %d attempts", worker, ", ".join(tags), attempt + 1)
                    return
                except Exception as exc:
                    attempt += 1
                    if attempt == REPORT_WARN_AFTER:
                        log.warning("worker %s cannot report %s yet (%s): still trying", worker, ", ".join(tags),
                                    exc)
                    await asyncio.sleep(min(REPORT_RETRY_MAX_S, 0.1 * 2 ** min(attempt, 10)))
        finally:
            if not done.done():
                done.set_result(None)

    def _assign_all(self, w: EmulatedWorker, cmds: tuple[AssignInstance, ...]) -> None:
        """Take on the instances of one assign message. Those whose files are there (or come at once) start
        together, as one task, and those waiting on a download start together once it is over: each group goes
        STARTING and RUNNING at the same moments (each instance still reported on its own, in the worker's
        report of that moment)."""
        groups: dict[str, list[EmulatedInstance]] = {}
        for cmd in cmds:
            if cmd.instance_id in w.instances:
                continue  # re-sent assignment: already running it
            inst = EmulatedInstance(cmd.instance_id, cmd.model, cmd.source, cmd.gpu_indexes, cmd.vram_claims)
            w.instances[inst.id] = inst
            w.changed()
            ready = not inst.source or w.files.get(inst.source) == ModelFileState.READY
            fetching = self.cfg.download_delay_s > 0 and not ready
            groups.setdefault(inst.source if fetching else "", []).append(inst)
        for insts in groups.values():
            self._spawn(self._start(w, insts))

    async def _start(self, w: EmulatedWorker, insts: list[EmulatedInstance]) -> None:
        for source in dict.fromkeys(inst.source for inst in insts):
            if source and w.files.get(source) != ModelFileState.READY:
                await self._download(w, source)
        # No SCHEDULED report: the commit recorded that already. The first report is STARTING.
        await asyncio.sleep(self.cfg.start_delay_s / 2)
        insts = await self._advance(w, insts, InstanceState.SCHEDULED, InstanceState.STARTING)
        await asyncio.sleep(self.cfg.start_delay_s / 2)
        if self.engines is not None:
            insts = await self._start_engines(w, insts)
        await self._advance(w, insts, InstanceState.STARTING, InstanceState.RUNNING)

    async def _start_engines(self, w: EmulatedWorker, insts: list[EmulatedInstance]) -> list[EmulatedInstance]:
        """Start the instances' servers together; returns those that answer (the others are reported ERROR,
        which the planner replaces). An instance deleted, drained or failed meanwhile has its server stopped again:
        it never served (its drain reported it idle at once)."""
        assert self.engines is not None
        from services.workers.engine_policy import engine_spec_args

        live = [inst for inst in insts if w.instances.get(inst.id) is inst and inst.state is InstanceState.STARTING]
        product, engines = w.worker.gpus[0].product if w.worker.gpus else "", self.engines
        outcomes = await asyncio.gather(
            *(engines.start(i.id, i.model, engine_spec_args(i.model, i.source, product, len(i.gpu_indexes)))
              for i in live),
            return_exceptions=True,
        )
        up, failed = [], []
        for inst, outcome in zip(live, outcomes, strict=True):
            if w.instances.get(inst.id) is not inst or inst.state is not InstanceState.STARTING:
                await engines.stop(inst.id)  # deleted or drained while its server started
            elif isinstance(outcome, BaseException):
                log.warning("worker %s: instance %s failed to start: %s", w.worker.name, inst.id, outcome)
                inst.state = InstanceState.ERROR
                failed.append(InstanceStatus(instance_id=inst.id, worker=w.worker.name, state=inst.state,
                                             message=f"engine server: {outcome}"[:200]))
            else:
                up.append(inst)
        if failed:
            await self._report(w, failed)
        return up

    async def _engine_exited(self, instance_id: str, code: int) -> None:
        """A server stopped on its own: its instance is ERROR (while DRAINING: idle, nothing is in flight)."""
        for w in self.workers.values():
            inst = w.instances.get(instance_id)
            if inst is None:
                continue
            log.warning("worker %s: engine server of %s exited with code %s", w.worker.name, instance_id, code)
            if inst.state is InstanceState.DRAINING:
                return  # its drain sees the server gone and reports it idle
            inst.state = InstanceState.ERROR
            await self._report(w, [InstanceStatus(instance_id=inst.id, worker=w.worker.name, state=inst.state,
                                                  message=f"engine server exited with code {code}")])
            return

    async def _advance(
        self, w: EmulatedWorker, insts: list[EmulatedInstance], was: InstanceState, state: InstanceState
    ) -> list[EmulatedInstance]:
        """Move the instances the worker still runs that are still ``was`` to ``state`` and report them; returns
        those. One drained or failed meanwhile (DRAINING, ERROR) stays so: start-up never undoes it."""
        live = [inst for inst in insts if w.instances.get(inst.id) is inst and inst.state is was]
        for inst in live:
            inst.state = state
        if live:
            name = w.worker.name
            await self._report(w, [InstanceStatus(instance_id=i.id, worker=name, state=state) for i in live])
        return live

    async def _download(self, w: EmulatedWorker, source: str) -> None:
        key = (w.worker.name, source)
        under_way = self._downloads.get(key)
        if under_way is not None:
            await under_way.wait()
            return
        under_way = self._downloads[key] = asyncio.Event()
        try:
            if self.cfg.download_delay_s > 0:  # a file that is there at once is only ever reported READY
                w.files[source] = ModelFileState.DOWNLOADING
                upd = ModelFileUpdate(worker=w.worker.name, source=source, state=ModelFileState.DOWNLOADING)
                await self.nc.publish(subjects.worker_files(w.worker.name), encode(upd))
                await asyncio.sleep(self.cfg.download_delay_s)
            w.files[source] = ModelFileState.READY
            upd = ModelFileUpdate(worker=w.worker.name, source=source, state=ModelFileState.READY, progress=1.0)
            await self.nc.publish(subjects.worker_files(w.worker.name), encode(upd))
        finally:
            del self._downloads[key]
            under_way.set()

    async def _drain(self, w: EmulatedWorker, cmd: DrainInstance) -> None:
        inst = w.instances.get(cmd.instance_id)
        if inst is None:
            return
        starting = inst.state in (InstanceState.SCHEDULED, InstanceState.STARTING)
        inst.state = InstanceState.DRAINING
        # Only a RUNNING instance was ever in a pool: one drained while starting has nothing in flight and is
        # idle at once (its start stops short, and stops a server under way).
        if not starting and self.engines is not None and self.engines.running(inst.id):
            if inst.id in self._draining:
                return  # a repeated drain: the first one's watch reports idle
            self._draining.add(inst.id)
            try:
                await self._wait_drained(w, inst)
            finally:
                self._draining.discard(inst.id)
            if w.instances.get(inst.id) is not inst or inst.state is not InstanceState.DRAINING:
                return  # deleted (the drain timed out) meanwhile
        await self._report(w, [InstanceStatus(instance_id=inst.id, worker=w.worker.name, state=inst.state, idle=True)])

    async def _wait_drained(self, w: EmulatedWorker, inst: EmulatedInstance) -> None:
        """Until the instance's engine has nothing in flight (polling its /metrics), it stops, or the instance
        is deleted."""
        assert self.engines is not None
        from services.workers.engine_policy import drain_idle

        since = time.monotonic()
        while w.instances.get(inst.id) is inst and self.engines.running(inst.id):
            load = await self.engines.load(inst.id)
            if drain_idle(load, time.monotonic() - since, self.cfg.drain_settle_s):
                return
            await asyncio.sleep(self.engines.opts.poll_interval_s)

    async def _delete(self, w: EmulatedWorker, cmd: DeleteInstance) -> None:
        inst = w.instances.pop(cmd.instance_id, None)
        if inst is not None:
            w.changed()
            if self.engines is not None:
                await self.engines.stop(inst.id)
            await self._report(w, [InstanceStatus(instance_id=inst.id, worker=w.worker.name, state=inst.state,
                                                  deleted=True)])


def _assignments(data: bytes) -> tuple[AssignInstance, ...]:
    """The instances an assign message names: several (``AssignInstances``) or one (``AssignInstance``)."""
    try:
        return decode(data, AssignInstances).instances
    except MessageError as several:
        try:
            return (decode(data, AssignInstance),)
        except MessageError as one:
            raise (several if b'"instances"' in data else one) from None


def _tag(msg: InstanceStatus) -> str:
    return "deleted" if msg.deleted else ("idle" if msg.idle else msg.state.value)


async def run_fleet(cfg: FleetConfig, nats_url: str, options: dict[str, Any] | None = None) -> None:
    """Connect (with ``options``: TLS, see ``shared.bus.runtime.nats_options``) and run the fleet until cancelled."""
    nc = await nats.connect(nats_url, max_reconnect_attempts=-1, pending_size=64 * 1024 * 1024, **(options or {}))
    fleet = Fleet(cfg, nc)
    try:
        await fleet.run()
    finally:
        await fleet.close()
        await close_promptly(nc)  # bounded, never raising: NATS may be gone or not answering
