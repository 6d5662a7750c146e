"""Keeps a service's in-memory ClusterSnapshot current from bus events (no Redis read per decision).

A feed starts from the Redis state (``load``) and then applies the inventories the state writer stored (its
announcements, never raw registrations), heartbeats, model-file updates, instance events and cordon events as
they arrive. It also tells its owner when the cluster
changed in a way that can make PENDING replicas schedulable (a worker joined or recovered, resources
were freed), which is what the reconciler retries on.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable

import msgspec

from shared.bus.messages import (
    CordonEvent,
    Heartbeat,
    InstanceEvent,
    ModelFileUpdate,
    WorkerRegisteredEvent,
    WorkerRegistration,
)
from shared.bus.validate import check_heartbeat, check_registration
from shared.core.placement.domain import Instance, InstanceState, ModelFile, Worker, WorkerState
from shared.core.placement.lifecycle import HOLDS_GPUS, ON_WORKER
from shared.core.placement.reconcile import workers_of
from shared.core.placement.snapshot import ClusterSnapshot
from shared.state.store import StateStore, apply_usage, gpu_field

log = logging.getLogger("gantry.feed")
# Instances whose claims are live in the ledger (the one set: see lifecycle).
HOLDING = HOLDS_GPUS

ChangeListener = Callable[[str], None]


class Feed(enum.Flag):
    """Cluster events a service's snapshot may follow besides workers and cordons (always followed). Each
    event fans out to every subscribed replica, so a service subscribes only to what its decisions read."""

    WORKERS_ONLY = 0
    FILES = enum.auto()  # model-file readiness (the locality scorer)
    CLAIMS = enum.auto()  # instances placed, released or removed: what GPUs hold, and instance counts
    PROGRESS = enum.auto()  # placed instances starting and running (their claims unchanged)
    ALL = FILES | CLAIMS | PROGRESS


class SnapshotFeed:
    """Applies bus events to a ClusterSnapshot; reports cluster changes to listeners."""

    def __init__(self, snapshot: ClusterSnapshot) -> None:
        self.snapshot = snapshot
        self.inventory: dict[str, Worker] = {}
        self.usage: dict[str, Heartbeat] = {}
        self._checked: dict[str, Worker] = {}  # worker -> the inventory its last accepted heartbeat was checked with
        self.last_seen: dict[str, float] = {}
        self.cordons: set[str] = set()
        self.instances: dict[str, Instance] = {}  # every known instance, any state
        # Indexes for the reconciler's periodic checks (a pass over every instance each second stalls the
        # event loop for milliseconds at thousands of instances):
        self.on_worker: dict[str, set[str]] = {}  # worker -> instances placed on it (main or subordinate)
        self.running_on: dict[str, set[str]] = {}  # worker -> its own SCHEDULED/STARTING/RUNNING instances
        self.unreachable: set[str] = set()  # UNREACHABLE instances
        self.listeners: list[ChangeListener] = []
        self.assumed: dict[str, float] = {}  # instance id -> when a decision was assumed (not committed yet)
        # Revision of each worker's inventory held here (kept when a worker leaves, so that a late announcement
        # cannot bring it back), and of the state loaded at start.
        self.revisions: dict[str, int] = {}
        self.loaded_revision = 0
        self.removals = 0  # workers dropped so far: a read of Redis that a removal overtook may hold a stale one
        self._removed_while_loading: set[str] | None = None  # workers dropped while ``load`` reads them

    # -- bootstrap ------------------------------------------------------------------------------------

    async def load(self, store: StateStore) -> None:
        """Initial state from Redis (inventories, last heartbeats, usage, cordons, files, instances)."""
        self.cordons = await store.cordons()
        # Read first: every inventory stored up to this revision is in what follows, so announcements up to it
        # are old news, while a newer one (even if it arrived during the load) wins over the loaded record.
        self.loaded_revision = await store.registration_revision()
        # Removals carry no revision: a worker removed while the read below runs may still be in what it returns,
        # and nothing would drop it again. The names heard removed meanwhile are kept out instead.
        self._removed_while_loading = set()
        try:
            stored, invalid = await store.worker_records()
            removed = self._removed_while_loading
        finally:
            self._removed_while_loading = None
        if invalid:  # reported on the bus once, by the state writer; each snapshot only logs what it left out
            log.warning("left out %d stored worker record(s) that break today's limits: %s", len(invalid),
                        "; ".join(f"{name[:64]}: {why}" for name, why in sorted(invalid.items())[:3]))
        for w in stored:
            if self.revisions.get(w.name, 0) > self.loaded_revision or w.name in removed:
                continue
            self.inventory[w.name] = w
            self.last_seen[w.name] = w.last_heartbeat
            self.snapshot.upsert_worker(w)
        for f in await store.model_files():
            self.snapshot.set_model_file(f)
        for inst in await store.instances():
            self._put_instance(inst)

    # -- events ---------------------------------------------------------------------------------------

    def on_registered(self, ev: WorkerRegisteredEvent, now: float, read: bool = False) -> str | None:
        """Apply an inventory the state writer stored, unless this snapshot holds that one or a newer one
        (duplicates and announcements overtaken by a newer store are ignored); a reason if it is invalid.
        ``read``: read from the store just now for a worker this snapshot lacks (as of ``ev.revision``, the store's
        own): applied even at the revision the snapshot last saw, which a reordered removal may have undone."""
        reason = check_registration(WorkerRegistration(worker=ev.worker))
        if reason:
            return reason
        name = ev.worker.name
        seen = max(self.revisions.get(name, 0), self.loaded_revision)
        if ev.revision < seen or (ev.revision == seen and not (read and name not in self.inventory)):
            return None
        self.revisions[name] = ev.revision
        before = self.inventory.get(name)
        self.inventory[name] = ev.worker
        self.last_seen[name] = now
        if before == ev.worker and self.snapshot.worker(name) is not None:
            # A periodic re-registration (every worker, every few heartbeats): only liveness moved. Rebuilding the
            # row would also drop the snapshot's memos (binpack's scores of every GPU) for nothing.
            self.snapshot.touch(name, now)
            return None
        self._refresh(name)
        if before is None:
            self._changed(f"worker {name} joined")
        elif grew(before, ev.worker):
            self._changed(f"inventory of {name} grew")
        return None

    def on_heartbeat(self, hb: Heartbeat, now: float) -> str | None:
        """Apply a heartbeat; a reason if it is invalid (unknown worker or GPU)."""
        inventory = self.inventory.get(hb.worker)
        prev = self.usage.get(hb.worker)
        same = prev is not None and prev.gpus == hb.gpus and prev.ram_used == hb.ram_used
        # The check reads only the usage figures and the inventory: the same figures the last heartbeat passed
        # with, against the same inventory, pass again (most heartbeats).
        if not (same and inventory is not None and self._checked.get(hb.worker) is inventory):
            reason = check_heartbeat(hb, inventory)
            if reason:
                return reason
            assert inventory is not None  # check_heartbeat refuses a worker without one
            self._checked[hb.worker] = inventory
        was_ready = self.snapshot.state(hb.worker, now) is WorkerState.READY
        self.usage[hb.worker] = hb
        self.last_seen[hb.worker] = now
        if same:
            self.snapshot.touch(hb.worker, now)  # most heartbeats: same usage, only the time moved
        else:
            self._refresh(hb.worker, usage_only=True)
        if not was_ready and not self.inventory[hb.worker].cordoned:
            self._changed(f"worker {hb.worker} recovered")
        return None

    def on_file(self, upd: ModelFileUpdate) -> None:
        """Apply a model-file readiness update of a worker this snapshot holds, as the state writer stores them (one
        of a worker it does not hold, or of a new source past the worker's limit, is left out: the state writer
        dead-letters those)."""
        if upd.worker not in self.inventory:
            return
        self.snapshot.set_model_file(
            ModelFile(source=upd.source, worker=upd.worker, state=upd.state, progress=upd.progress)
        )

    def assume(self, inst: Instance, now: float) -> None:
        """Count a decided, not yet committed placement in the snapshot until its outcome is known."""
        self.assumed[inst.id] = now
        self.snapshot.upsert_instance(inst)

    def expire_assumptions(self, now: float, ttl: float) -> None:
        """Drop assumptions whose outcome never arrived (the commit message may have been lost)."""
        for iid, at in list(self.assumed.items()):
            if now - at > ttl:
                self.forget_assumption(iid)

    def forget_assumption(self, iid: str) -> None:
        """Drop this snapshot's assumed placement of ``iid`` (its known record, if any, counts again)."""
        if self.assumed.pop(iid, None) is None:
            return
        real = self.instances.get(iid)
        if real is not None:
            self._put_instance(real)
        else:
            self.snapshot.remove_instance(iid)

    def on_instance(self, ev: InstanceEvent) -> None:
        """Apply an instance change; freed resources count as a cluster change."""
        at = self.assumed.get(ev.instance.id)
        if at is not None:
            if ev.instance.worker is None and not ev.removed and ev.at < at:
                return  # the PENDING record from before our assumption: keep the assumption
            del self.assumed[ev.instance.id]
        old = self.instances.get(ev.instance.id)
        if ev.removed:
            if old is not None:
                self._index(old, add=False)
            self.instances.pop(ev.instance.id, None)
            self.snapshot.remove_instance(ev.instance.id)
        else:
            self._put_instance(ev.instance)
        freed = old is not None and old.worker is not None and (
            ev.removed or ev.instance.state not in HOLDING
        )
        if freed:
            self._changed(f"resources freed by {ev.instance.id}")

    def on_instances(self, events: Iterable[InstanceEvent]) -> None:
        """Apply instance changes in order, as ``on_instance`` does one by one (each touched worker's usage is
        recomputed once, after the last of them)."""
        with self.snapshot.batched():
            for ev in events:
                self.on_instance(ev)

    def on_worker_removed(self, name: str) -> None:
        """Drop a worker that left the state (forgotten or removed by an operator) from every view."""
        self.removals += 1
        if self._removed_while_loading is not None:
            self._removed_while_loading.add(name)
        self.inventory.pop(name, None)
        self.usage.pop(name, None)
        self._checked.pop(name, None)
        self.last_seen.pop(name, None)
        self.cordons = {c for c in self.cordons if c != name and not c.startswith(name + ":")}
        if self.snapshot.worker(name) is not None:
            self.snapshot.remove_worker(name)
        # its files go with it, as the store drops them: a worker back under this name starts with none
        for f in [f for f in self.snapshot.model_files() if f.worker == name]:
            self.snapshot.remove_model_file(f.source, name)

    def on_cordon(self, ev: CordonEvent) -> None:
        """Apply a cordon change to the worker (or GPU)."""
        field = ev.worker if ev.gpu_index is None else gpu_field(ev.worker, ev.gpu_index)
        if ev.cordoned:
            self.cordons.add(field)
        else:
            self.cordons.discard(field)
            self._changed(f"{field} uncordoned")
        self._refresh(ev.worker)

    # -- helpers --------------------------------------------------------------------------------------

    def _put_instance(self, inst: Instance) -> None:
        old = self.instances.get(inst.id)
        if old is None or _index_key(old) != _index_key(inst):  # most changes (STARTING → RUNNING) keep it
            if old is not None:
                self._index(old, add=False)
            self._index(inst, add=True)
        self.instances[inst.id] = inst
        if inst.worker is not None and inst.state in HOLDING:
            self.snapshot.upsert_instance(inst)
        else:
            self.snapshot.remove_instance(inst.id)

    def _index(self, inst: Instance, add: bool) -> None:
        for w in workers_of(inst):
            _mark(self.on_worker, w, inst.id, add)
        if inst.worker and inst.state in ON_WORKER:
            _mark(self.running_on, inst.worker, inst.id, add)
        if inst.state is InstanceState.UNREACHABLE:
            if add:
                self.unreachable.add(inst.id)
            else:
                self.unreachable.discard(inst.id)

    def _refresh(self, name: str, usage_only: bool = False) -> None:
        inv = self.inventory.get(name)
        if inv is None:
            return
        w = apply_usage(inv, self.usage.get(name), self.last_seen.get(name, 0.0), self.cordons)
        if usage_only:  # a heartbeat: the inventory and cordons are those of the last full refresh
            self.snapshot.update_usage(w)
        else:
            self.snapshot.upsert_worker(w)

    def _changed(self, why: str) -> None:
        for listener in self.listeners:
            listener(why)

    def worker(self, name: str) -> Worker | None:
        """The snapshot's current record of a worker."""
        return self.snapshot.worker(name)


def grew(before: Worker, after: Worker) -> bool:
    """Whether a re-registration offers room the old inventory did not: more RAM, a new GPU, a larger or newly
    schedulable GPU, or the worker's own cordon lifted."""
    old = {g.index: g for g in before.gpus}
    for g in after.gpus:
        prev = old.get(g.index)
        if prev is None or g.vram_total > prev.vram_total or (g.schedulable and not prev.schedulable):
            return True
    return after.ram_total > before.ram_total or (before.cordoned and not after.cordoned)


def _index_key(inst: Instance) -> tuple[object, ...]:
    """What decides an instance's entries in the feed's indexes (see ``_index``): equal keys, equal entries."""
    state = inst.state
    return inst.worker, inst.subordinates, state in ON_WORKER, state is InstanceState.UNREACHABLE


def _mark(index: dict[str, set[str]], key: str, iid: str, add: bool) -> None:
    if add:
        index.setdefault(key, set()).add(iid)
        return
    ids = index.get(key)
    if ids is not None:
        ids.discard(iid)
        if not ids:
            del index[key]


def replace_state(inst: Instance, state: InstanceState, reason: str | None = None) -> Instance:
    """A copy of ``inst`` in ``state`` (reason kept unless given)."""
    return msgspec.structs.replace(inst, state=state, reason=reason if reason is not None else inst.reason)
