"""The state writer: validates worker reports and writes them to Redis in batches.

Runs inside the reconciler, subscribed with a queue group so that several reconciler replicas split
the write load. Invalid reports (bad inventory, heartbeats from unknown workers or for unknown GPUs)
are dead-lettered here, once, rather than by every service that reads them. A registration is stored only if
it keeps what its worker holds claims on; what was stored is announced (``WorkerRegisteredEvent``) and every
snapshot follows those announcements, so the services, Redis and the ledger hold one inventory per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from services.reconciler.contract import WRITER_QUEUE
from shared.bus import subjects
from shared.bus.messages import (
    Heartbeat,
    ModelFileUpdate,
    SyncRequest,
    WorkerRegisteredEvent,
    WorkerRegistration,
    encode,
)
from shared.bus.validate import (
    bad_worker_name,
    check_heartbeat,
    check_inventory_change,
    check_registration,
    impersonation,
)
from shared.core.limits import MAX_FILES_PER_WORKER
from shared.core.placement.domain import ModelFile, Worker
from shared.core.placement.records import invalid_reports
from shared.host.throttle import PerKeyThrottle
from shared.state.store import Keys

if TYPE_CHECKING:
    from shared.host.service import PlacementService

log = logging.getLogger("gantry.writer")
QUEUE = WRITER_QUEUE
STORE_ROUNDS = 3  # checks of one registration against what is stored, when other writers or commits move first
# Replaced registrations held for judging: a worker changing its inventory on every message (or any worker while Redis
# is away, when nothing is flushed) must not grow the list without end; past this, the oldest go unjudged.
SUPERSEDED_MAX = 1000
READY_WAIT_S = 5.0
"""Longest reports wait for the snapshot load, counted from the first that waited: a load that never ends (Redis
connected but silent) would otherwise hold each subscription's reports for ever, one behind the other. Past it they
are judged as they come, against what is loaded (as before reports waited)."""
INVALID_SUBJECT = Keys.workers  # dead letters of invalid stored records name the Redis key they were read from


class StateWriter:
    """Buffers the latest report per worker and flushes them to Redis every ``flush_s``."""

    def __init__(self, service: PlacementService, flush_s: float = 0.1) -> None:
        self.service = service
        self.flush_s = flush_s
        self.registrations: dict[str, Worker] = {}
        # registrations a newer one of the same worker replaced before a flush: never stored, but still judged, so
        # a bad one is dead-lettered although its worker's genuine registration came right after it
        self.superseded: list[Worker] = []
        self.unjudged = 0  # replaced registrations dropped since the last flush (past SUPERSEDED_MAX)
        self.beats: dict[str, tuple[Heartbeat, float]] = {}
        self.files: dict[tuple[str, str], ModelFile] = {}
        self._task: asyncio.Task[None] | None = None
        self._asked = PerKeyThrottle(5.0)
        # Model sources each worker reported files of through this writer: every one stays in Redis (and in every
        # scoring snapshot) until its worker leaves, so past MAX_FILES_PER_WORKER a new one is refused. Counted per
        # writer (replicas split the reports), which bounds what a worker stores to that many per writer run.
        self.sources: dict[str, set[str]] = {}
        self._wait_until: float | None = None  # (event loop time) reports wait for the load until then
        self._wire()

    def _wire(self) -> None:
        svc = self.service

        async def on_register(body: bytes, sender: str) -> None:
            reg = await svc.bus.decode_or_reject(subjects.REGISTER, body, WorkerRegistration)
            if reg is None:
                return
            reason = impersonation(reg.worker.name, sender) or check_registration(reg)
            if reason:
                await svc.bus.dead_letter(subjects.REGISTER, reason, body)
                return
            replaced = self.registrations.get(reg.worker.name)
            if replaced is not None and replaced != reg.worker:
                self.keep_superseded([replaced])
            self.registrations[reg.worker.name] = reg.worker

        async def on_heartbeat(body: bytes, sender: str) -> None:
            hb = await svc.bus.decode_or_reject(subjects.HEARTBEAT, body, Heartbeat)
            if hb is None:
                return
            forged = impersonation(hb.worker, sender)
            if forged:
                await svc.bus.dead_letter(subjects.HEARTBEAT, forged, body)
                return
            if not svc.ready.is_set():  # heard while the snapshot loads: judged then every worker would be unknown
                await self.loaded()
            reason, ask = judge_heartbeat(hb, svc.feed.inventory.get(hb.worker), self.registrations.get(hb.worker))
            if ask:
                await self.ask_to_register(hb.worker)  # its own registration repairs what is stored of it
            if reason:
                await svc.bus.dead_letter(subjects.HEARTBEAT, reason, body)
                return
            self.beats[hb.worker] = (hb, svc.clock())

        async def on_file(body: bytes, sender: str) -> None:
            upd = await svc.bus.decode_or_reject(subjects.MODEL_FILE, body, ModelFileUpdate)
            if upd is None:
                return
            reason = impersonation(upd.worker, sender) or bad_worker_name(upd.worker)
            if not reason and not svc.ready.is_set():  # as for heartbeats: the snapshot first
                await self.loaded()
            if not reason and upd.worker not in self.registrations and upd.worker not in svc.feed.inventory:
                reason = f"from unknown worker {upd.worker!r} (register first)"
            if not reason and not self.room_for(upd.worker, upd.source):
                reason = f"worker {upd.worker} reports files of more than {MAX_FILES_PER_WORKER} model sources"
            if reason:
                await svc.bus.dead_letter(subjects.MODEL_FILE, f"model file: {reason}", body)
                return
            self.files[(upd.source, upd.worker)] = ModelFile(
                source=upd.source, worker=upd.worker, state=upd.state, progress=upd.progress
            )

        svc.listen_reports(subjects.REGISTER, on_register, queue=QUEUE)
        svc.listen_reports(subjects.HEARTBEAT, on_heartbeat, queue=QUEUE)
        svc.listen_reports(subjects.MODEL_FILE, on_file, queue=QUEUE)

    async def loaded(self) -> bool:
        """Wait for the snapshot load, until ``READY_WAIT_S`` after the first report that waited; whether it ended."""
        ready = self.service.ready
        if ready.is_set():
            return True
        loop = asyncio.get_running_loop()
        if self._wait_until is None:
            self._wait_until = loop.time() + READY_WAIT_S
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ready.wait(), max(0.0, self._wait_until - loop.time()))
        if not ready.is_set():
            log.warning("snapshot still loading after %.0f s: reports judged against what is loaded", READY_WAIT_S)
        return ready.is_set()

    def keep_superseded(self, workers: list[Worker]) -> None:
        """Hold replaced registrations for judging, the newest ``SUPERSEDED_MAX`` at most."""
        self.superseded.extend(workers)
        if len(self.superseded) > SUPERSEDED_MAX:
            dropped = len(self.superseded) - SUPERSEDED_MAX
            del self.superseded[:dropped]
            self.unjudged += dropped  # logged once per flush, not once per message

    def room_for(self, worker: str, source: str) -> bool:
        """Whether ``worker``'s files of ``source`` may be stored (counted as stored if so)."""
        held = self.sources.get(worker)
        if held is None:
            if len(self.sources) > 2 * len(self.service.feed.inventory) + 64:  # workers gone: forget their counts
                known = self.service.feed.inventory
                self.sources = {w: got for w, got in self.sources.items() if w in known or w in self.registrations}
            held = self.sources[worker] = set()
        if source in held:
            return True
        if len(held) >= MAX_FILES_PER_WORKER:
            return False
        held.add(source)
        return True

    async def store_registrations(self, regs: dict[str, Worker]) -> dict[str, int]:
        """Store the registrations that keep every GPU and the RAM their worker holds claims on (the ledger's view);
        dead-letter the others with the reason. Each change is checked against the stored record and stored only
        over that record, atomically with the ledger's claims (``StateStore.register_workers``); when another
        writer or a commit moved first, it is checked again. Returns the revision of each stored inventory."""
        store, pending, out = self.service.store, dict(regs), {}
        verdicts: dict[str, str] = {}
        for _ in range(STORE_ROUNDS):
            held = await store.held(list(pending))
            checked: dict[str, Worker] = {}
            for name, new in pending.items():
                h = held.get(name)
                reason = check_inventory_change(h.worker, new, h.gpus, h.ram) if h is not None else None
                if reason:
                    await self.refuse(new, reason)
                else:
                    checked[name] = new
            expected = {name: held[name].raw if name in held else None for name in checked}
            verdicts = await store.register_workers(list(checked.values()), self.service.clock(), expected)
            out.update({name: int(v) for name, v in verdicts.items() if v.isdigit()})
            pending = {name: checked[name] for name, v in verdicts.items() if not v.isdigit()}
            if not pending:
                return out
        for name, worker in pending.items():
            if verdicts[name] == "stale":  # still racing another writer: the next flush tries again
                self.registrations.setdefault(name, worker)
            else:  # claims the stored record does not show (outside today's limits): never under a live claim
                await self.refuse(worker, f"register {name}: {verdicts[name].removeprefix('held:')} holds claims")
        return out

    async def judge_superseded(self, workers: list[Worker]) -> None:
        """Dead-letter each replaced registration that would have been refused against the stored record."""
        if not workers:
            return
        held = await self.service.store.held(list(dict.fromkeys(w.name for w in workers)))
        for new in workers:
            h = held.get(new.name)
            reason = check_inventory_change(h.worker, new, h.gpus, h.ram) if h is not None else None
            if reason:
                await self.refuse(new, reason)

    async def refuse(self, worker: Worker, reason: str) -> None:
        """Dead-letter a registration the state keeps out."""
        await self.service.bus.dead_letter(subjects.REGISTER, reason, encode(WorkerRegistration(worker=worker)))

    async def announce(self, regs: dict[str, Worker], revisions: dict[str, int]) -> None:
        """Tell every snapshot what was stored (the feeds follow these events, not raw registrations). One that
        cannot be sent is stored and announced again at the next flush, under a newer revision."""
        for name, revision in revisions.items():
            event = WorkerRegisteredEvent(worker=regs[name], revision=revision)
            try:
                await self.service.bus.publish(subjects.EVENT_WORKER_REGISTERED, event)
            except Exception as exc:
                log.warning("registration of %s stored, not announced (again at the next flush): %s", name, exc)
                self.registrations.setdefault(name, regs[name])

    async def report_invalid(self) -> dict[str, str]:
        """Look for stored worker records that break today's limits among those this snapshot does not hold (every
        snapshot leaves them out, so their workers vanish without a word), and dead-letter each once with its key
        and reason (again only if its reason changes); returns them all (worker -> why). Runs in the periodic
        check, so one reconciler replica at a time."""
        svc, store = self.service, self.service.store
        unseen = sorted(await store.worker_names() - svc.feed.inventory.keys())
        invalid = await store.invalid_workers(unseen)
        todo = invalid_reports(invalid, await store.reported_invalid())
        for name, why in todo.report.items():
            shown = name[:64]  # a key written past the state layer can be of any length
            await svc.bus.dead_letter(
                INVALID_SUBJECT, f"stored record of worker {shown} left out of every snapshot: {why} "
                f"(its next valid registration replaces it; `gantry workers remove {shown}` clears it)",
            )
        if todo.report or todo.forget:
            await store.mark_reported(todo.report, todo.forget)
        svc.metrics.invalid_workers.labels(svc.name).set(len(invalid))
        return invalid

    async def ask_to_register(self, worker: str | None) -> None:
        """Ask one worker (or all) to re-register; per worker at most once every few seconds."""
        now = self.service.clock()
        key = worker or "*"
        if not self._asked.allow(key, now):
            return
        await self.service.bus.publish(subjects.SYNC, SyncRequest(by="reconciler", worker=worker))

    def start(self) -> None:
        """Ask every worker to register (we may have missed them), then flush in the background."""
        self._task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        await self.ask_to_register(None)
        while True:
            await asyncio.sleep(self.flush_s)
            try:
                await self.flush()
            except Exception:
                task = asyncio.current_task()
                if task is not None and task.cancelling():  # shutdown, reported by a library as its own error
                    raise
                log.exception("state writer flush failed (will retry)")

    async def flush(self) -> None:
        """Write everything buffered since the last flush (a few pipelined round trips)."""
        store = self.service.store
        regs, self.registrations = self.registrations, {}
        superseded, self.superseded = self.superseded, []
        if self.unjudged:
            log.warning("%d replaced registrations went unjudged (more than %d waiting)", self.unjudged, SUPERSEDED_MAX)
            self.unjudged = 0
        beats, self.beats = self.beats, {}
        files, self.files = self.files, {}
        try:
            await self.judge_superseded(superseded)
            revisions = await self.store_registrations(regs) if regs else {}
            await store.record_heartbeats(list(beats.values()))
            await store.set_model_files(files.values())
        except Exception:
            # Keep what we had (newer reports win) and retry on the next flush.
            for k, v in regs.items():
                self.registrations.setdefault(k, v)
            newer, self.superseded = self.superseded, []
            self.keep_superseded([*superseded, *newer])
            for k2, b in beats.items():
                self.beats.setdefault(k2, b)
            for k3, f in files.items():
                self.files.setdefault(k3, f)
            raise
        await self.announce(regs, revisions)


def judge_heartbeat(hb: Heartbeat, stored: Worker | None, pending: Worker | None) -> tuple[str | None, bool]:
    """Why a heartbeat is refused (None: stored), checked against the stored inventory (which the feed follows)
    or a registration not stored yet; and whether to ask its worker to register again (it speaks of a worker or
    GPUs the stored inventory does not have)."""
    refused = reason = check_heartbeat(hb, stored)
    if reason and pending is not None and check_heartbeat(hb, pending) is None:
        reason = None
    # Only a heartbeat the stored inventory refused can be unlike it (unknown worker or GPU): the usual one,
    # accepted, skips that second look at its GPUs (every worker, every few seconds).
    ask = refused is not None and unlike_stored(hb, stored) and not bad_worker_name(hb.worker)
    return reason, ask


def unlike_stored(hb: Heartbeat, stored: Worker | None) -> bool:
    """Whether a heartbeat speaks of a worker, or of GPUs, that the stored inventory does not have."""
    if stored is None:
        return True
    known = {g.index for g in stored.gpus}
    return any(u.index not in known for u in hb.gpus)
