"""The state writer: validates worker reports and writes them to Redis in batches.

Runs inside the reconciler, subscribed with a queue group so that several reconciler replicas split
the write load. Invalid reports (bad inventory, heartbeats from unknown workers or for unknown GPUs)
are dead-lettered here, once, rather than by every service that reads them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from services.reconciler.contract import WRITER_QUEUE
from shared.bus import subjects
from shared.bus.messages import Heartbeat, ModelFileUpdate, SyncRequest, WorkerRegistration, encode
from shared.bus.validate import (
    bad_worker_name,
    check_heartbeat,
    check_inventory_change,
    check_registration,
    impersonation,
)
from shared.core.placement.domain import ModelFile, Worker

if TYPE_CHECKING:
    from shared.host.service import PlacementService

log = logging.getLogger("gantry.writer")
QUEUE = WRITER_QUEUE


class StateWriter:
    """Buffers the latest report per worker and flushes them to Redis every ``flush_s``."""

    def __init__(self, service: PlacementService, flush_s: float = 0.1) -> None:
        self.service = service
        self.flush_s = flush_s
        self.registrations: dict[str, Worker] = {}
        self.beats: dict[str, tuple[Heartbeat, float]] = {}
        self.files: dict[tuple[str, str], ModelFile] = {}
        self._task: asyncio.Task[None] | None = None
        self._asked: dict[str, float] = {}
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
            self.registrations[reg.worker.name] = reg.worker

        async def on_heartbeat(body: bytes, sender: str) -> None:
            hb = await svc.bus.decode_or_reject(subjects.HEARTBEAT, body, Heartbeat)
            if hb is None:
                return
            forged = impersonation(hb.worker, sender)
            if forged:
                await svc.bus.dead_letter(subjects.HEARTBEAT, forged, body)
                return
            inventory = self.registrations.get(hb.worker) or svc.feed.inventory.get(hb.worker)
            reason = check_heartbeat(hb, inventory)
            if inventory is None and not bad_worker_name(hb.worker):
                await self.ask_to_register(hb.worker)
            if reason:
                await svc.bus.dead_letter(subjects.HEARTBEAT, reason, body)
                return
            self.beats[hb.worker] = (hb, svc.clock())

        async def on_file(body: bytes, sender: str) -> None:
            upd = await svc.bus.decode_or_reject(subjects.MODEL_FILE, body, ModelFileUpdate)
            if upd is None:
                return
            reason = impersonation(upd.worker, sender) or bad_worker_name(upd.worker)
            if not reason and upd.worker not in self.registrations and upd.worker not in svc.feed.inventory:
                reason = f"from unknown worker {upd.worker!r} (register first)"
            if reason:
                await svc.bus.dead_letter(subjects.MODEL_FILE, f"model file: {reason}", body)
                return
            self.files[(upd.source, upd.worker)] = ModelFile(
                source=upd.source, worker=upd.worker, state=upd.state, progress=upd.progress
            )

        svc.listen_reports(subjects.REGISTER, on_register, queue=QUEUE)
        svc.listen_reports(subjects.HEARTBEAT, on_heartbeat, queue=QUEUE)
        svc.listen_reports(subjects.MODEL_FILE, on_file, queue=QUEUE)

    async def refuse_inventory_changes(self, regs: dict[str, Worker]) -> dict[str, Worker]:
        """The registrations that keep every GPU their worker holds claims on (the ledger's view); the others
        are dead-lettered with the reason and not written."""
        held = await self.service.store.held(list(regs))
        kept: dict[str, Worker] = {}
        for name, new in regs.items():
            old, claimed = held.get(name, (None, {}))
            reason = check_inventory_change(old, new, claimed)
            if reason:
                await self.service.bus.dead_letter(subjects.REGISTER, reason, encode(WorkerRegistration(worker=new)))
            else:
                kept[name] = new
        return kept

    async def ask_to_register(self, worker: str | None) -> None:
        """Ask one worker (or all) to re-register; per worker at most once every few seconds."""
        now = self.service.clock()
        key = worker or "*"
        if now - self._asked.get(key, float("-inf")) < 5.0:
            return
        self._asked[key] = now
        await self.service.bus.publish(subjects.SYNC, SyncRequest(worker=worker))

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
        beats, self.beats = self.beats, {}
        files, self.files = self.files, {}
        try:
            if regs:
                regs = await self.refuse_inventory_changes(regs)
            await store.register_workers(list(regs.values()), seen_at=self.service.clock())
            await store.record_heartbeats(list(beats.values()))
            await store.set_model_files(files.values())
        except Exception:
            # Keep what we had (newer reports win) and retry on the next flush.
            for k, v in regs.items():
                self.registrations.setdefault(k, v)
            for k2, b in beats.items():
                self.beats.setdefault(k2, b)
            for k3, f in files.items():
                self.files.setdefault(k3, f)
            raise
