"""The reconciler: owns desired vs actual.

Consumes scale/cordon commands, scored placement outcomes and instance status (JetStream), and worker
reports (core NATS, written to Redis in batches by its state writer). Commits decisions with the
ledger's atomic compare-and-set, re-places refused ones, drains and deletes on scale-down, replaces
instances of lost workers and retries PENDING replicas when the cluster changes. Every decision it
takes comes from the pure core (``shared.core.placement``); this module only moves data.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import secrets
import zlib
from collections import defaultdict
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any

import msgspec
from nats.aio.msg import Msg

from services.reconciler.contract import CONSUMES, EMITS
from services.reconciler.writer import StateWriter
from shared.bus import streams, subjects
from shared.bus.messages import (
    AssignInstance,
    CordonCommand,
    CordonEvent,
    DecisionEvent,
    DecisionEvents,
    DeleteInstance,
    DrainInstance,
    InstanceEvent,
    InstanceEvents,
    InstanceStatus,
    ItemOutcome,
    ModelEvent,
    ModelEvents,
    PlacementItem,
    PlacementRequest,
    PlacementScored,
    ScaleCommand,
    UnschedulableEvent,
)
from shared.bus.validate import bad_worker_name, check_scale
from shared.core.placement import scale_down_order
from shared.core.placement.domain import Instance, InstanceState, ModelSpec, Unschedulable, WorkerState
from shared.core.placement.reconcile import (
    ACTIVE,
    ON_WORKER,
    GiveUp,
    after_refusal,
    drain_finished,
    plan_scale,
    resync_workers,
    silent_workers,
    unreachable_instances,
)
from shared.host.feed import Feed
from shared.host.service import PlacementService, ack_all, guarded
from shared.state.store import CommitItem, ScaleUp

log = logging.getLogger("gantry.reconciler")
# Each tick resyncs one shard of the workers (their reported instances against the ledger), so every
# worker is compared once per RESYNC_SHARDS ticks and no tick compares them all: at thousands of
# instances a full pass holds the event loop for milliseconds.
RESYNC_SHARDS = 5
FULL_EVERY = 10  # ticks between full re-converges of every model
EVENTS_PER_MESSAGE = 1000  # instance changes or decisions per events message (well under 1 MB)


def resync_shard_of(worker: str) -> int:
    """The tick shard (of ``RESYNC_SHARDS``) that resyncs ``worker``: stable across processes."""
    return zlib.crc32(worker.encode()) % RESYNC_SHARDS


class Reconciler(PlacementService):
    """Desired-state loop and commit point of the placement pipeline."""

    name = "reconciler"
    consumes = CONSUMES
    emits = EMITS

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.specs: dict[str, ModelSpec] = {}
        self.requested: dict[str, float] = {}  # instance id -> when this process last requested it
        self.seen_placed: dict[str, float] = {}  # instance id -> when first seen committed
        self.changed = False
        self.last_change = 0.0
        self.retry_again_at = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.writer = StateWriter(self)

    def feeds(self) -> Feed:
        """Instance claims and states (scale-down ranks by state); file readiness goes to Redis through
        the state writer's own subscription, not into this snapshot."""
        return Feed.CLAIMS | Feed.PROGRESS

    def consumers(self) -> Sequence[tuple[str, str, str]]:
        """Commands, scored outcomes and instance status."""
        return (
            (streams.STREAM_CMD, streams.CONSUMER_SCALE, subjects.CMD_ALL),
            (streams.STREAM_PIPE, streams.CONSUMER_COMMIT, subjects.PLACEMENT_SCORED),
            (streams.STREAM_STATUS, streams.CONSUMER_STATUS, subjects.INSTANCE_STATUS),
        )

    def register(self) -> None:
        """Pull loops for the three consumers."""

        async def on_commands(raws: list[Msg]) -> None:
            await self.handle_commands(raws)

        async def on_scored(raws: list[Msg]) -> None:
            await self.consume(raws, PlacementScored, subjects.PLACEMENT_SCORED, self.handle_scored)

        async def on_status(raws: list[Msg]) -> None:
            await self.consume(raws, InstanceStatus, subjects.INSTANCE_STATUS, self.handle_status)

        self.pull(streams.STREAM_CMD, streams.CONSUMER_SCALE, subjects.CMD_ALL, on_commands,
                  linger=self.settings.command_linger_s)
        self.pull(streams.STREAM_PIPE, streams.CONSUMER_COMMIT, subjects.PLACEMENT_SCORED, on_scored)
        # Status reports (several per placement) are not on the placement path: batch them up.
        self.pull(streams.STREAM_STATUS, streams.CONSUMER_STATUS, subjects.INSTANCE_STATUS, on_status,
                  linger=self.settings.status_linger_s)

    async def started(self) -> None:
        """Load specs, listen for cluster changes, start the state writer and the periodic checks."""
        self.specs = await self.store.models()
        self.feed.listeners.append(self._on_cluster_change)
        self.writer.start()
        self._spawn(self._tick_loop())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_cluster_change(self, why: str) -> None:
        log.info("cluster change: %s", why)
        self.changed = True
        self.last_change = self.clock()

    # ================================================================ commands

    async def handle_commands(self, raws: list[Msg]) -> None:
        """A pulled batch of commands, in stream order.

        Scale commands for one model are coalesced: the last one sets the desired replicas and one
        converge creates every missing replica; the placement requests of the whole batch travel
        together. Invalid commands are dead-lettered. If the batch's one-call converge fails, every
        command of the batch is redelivered; if a model's locked converge (scale-down) fails, that
        model's commands are.
        """
        scales: dict[str, list[tuple[Msg, ScaleCommand, float]]] = {}
        for raw in raws:
            if raw.subject == subjects.CORDON:
                await guarded(self, raw.subject, [raw], functools.partial(self._cordon, raw.data, raw))
                continue
            cmd = await self._valid_scale(raw)
            if cmd is not None:
                meta = raw.metadata
                arrived = meta.timestamp.timestamp() if meta.timestamp else self.clock()
                scales.setdefault(cmd.model, []).append((raw, cmd, arrived))
        now = self.clock()
        wanted = {
            model: ScaleUp(model=model, replicas=cmds[-1][1].replicas, spec=self.specs[model],
                           seq=cmds[-1][0].metadata.sequence.stream, created_at=now)
            for model, cmds in scales.items()
        }
        arrivals = {model: [a for _, _, a in cmds] for model, cmds in scales.items()}
        items: list[PlacementItem] = []
        specs: dict[str, ModelSpec] = {}
        slow: dict[str, ScaleUp] = {}
        all_raws = [r for cmds in scales.values() for r, _, _ in cmds]

        async def fast() -> None:
            slow.update(await self.converge_fast(list(wanted.values()), arrivals, items, specs))

        done: list[Msg] = []
        if all_raws and await guarded(self, subjects.SCALE, all_raws, fast):
            failed: set[str] = set()
            for model, up in slow.items():

                async def work(m: str = model, u: ScaleUp = up) -> None:
                    got, spec_now = await self.converge(m, scale=u, arrivals=arrivals.get(m, ()))
                    items.extend(got)
                    if spec_now is not None:
                        specs[m] = spec_now

                if not await guarded(self, subjects.SCALE, [r for r, _, _ in scales[model]], work):
                    failed.add(model)
            done = [r for model, cmds in scales.items() if model not in failed for r, _, _ in cmds]
        if items:
            await self.publish_items(items, specs, self.clock())
        await ack_all(done)

    async def converge_fast(
        self,
        wanted: Sequence[ScaleUp],
        arrivals: dict[str, list[float]],
        items: list[PlacementItem],
        specs: dict[str, ModelSpec],
    ) -> dict[str, ScaleUp]:
        """Converge many models in one atomic Redis call (scale commands recorded, missing replicas made).

        Appends the placement items to request and the models' specs; returns the models left to the
        locked path (``converge``): those being scaled down, by us (scale already recorded) or elsewhere.
        """
        now = self.clock()
        slow: dict[str, ScaleUp] = {}
        known: dict[str, ModelSpec] = {}
        for w in wanted:  # a model without a spec cannot be requested: create nothing for it
            spec = self.specs.get(w.model) or await self.store.model(w.model) or w.spec
            if spec is not None:
                known[w.model] = spec
        wanted = [w for w in wanted if w.model in known]
        by_model = {w.model: w for w in wanted}
        changed: list[ModelEvent] = []
        created: list[Instance] = []
        for res in await self.store.converge_up(wanted, ACTIVE):
            up = by_model[res.model]
            if res.status == "busy":
                slow[res.model] = up
                continue
            if res.applied and up.replicas is not None:
                changed.append(ModelEvent(model=res.model, replicas=up.replicas, spec=up.spec))
            if res.status == "down":
                slow[res.model] = ScaleUp(model=res.model)
                continue
            specs[res.model] = known[res.model]
            created += res.created
            times = arrivals.get(res.model) or [now]
            items += [
                PlacementItem(instance_id=inst.id, model=res.model, requested_at=times[min(k, len(times) - 1)])
                for k, inst in enumerate(res.created)
            ]
            items += [
                PlacementItem(instance_id=i, model=res.model, requested_at=now)
                for i in res.unrequested if self._needs_request(i, now)
            ]
        await self._publish_instances(created)  # one message for the whole batch, not one per model
        if changed:
            await self.bus.publish(subjects.EVENT_MODEL, ModelEvents(events=tuple(changed)))
        return slow

    async def _valid_scale(self, raw: Msg) -> ScaleCommand | None:
        """Decode and check a scale command; dead-letter (and ack) it when invalid."""
        cmd = await self.bus.decode_or_reject(raw.subject, raw.data, ScaleCommand)
        if cmd is None:
            await raw.ack()
            return None
        known = self.specs.get(cmd.model) or await self.store.model(cmd.model)
        reason = check_scale(cmd, known)
        if reason:
            await self.bus.dead_letter(raw.subject, reason, raw.data)
            await raw.ack()
            return None
        spec = cmd.spec or known
        assert spec is not None
        self.specs[cmd.model] = msgspec.structs.replace(spec, replicas=cmd.replicas)
        return cmd

    async def _cordon(self, data: bytes, raw: Msg) -> None:
        cmd = await self.bus.decode_or_reject(raw.subject, data, CordonCommand)
        if cmd is None:
            await raw.ack()
            return
        reason = bad_worker_name(cmd.worker)
        if reason or cmd.worker not in self.feed.inventory:
            why = reason or f"cordon: unknown worker {cmd.worker!r}"
            await self.bus.dead_letter(raw.subject, why, data)
            await raw.ack()
            return
        await self.store.set_cordon(cmd.worker, cmd.cordoned, cmd.gpu_index)
        await self.bus.publish(
            subjects.EVENT_CORDON, CordonEvent(worker=cmd.worker, cordoned=cmd.cordoned, gpu_index=cmd.gpu_index)
        )
        await raw.ack()

    # ================================================================ converge

    async def _lock(self, model: str) -> str:
        for attempt in range(400):
            token = await self.store.lock_model(model)
            if token:
                return token
            await asyncio.sleep(min(0.05, 0.002 * (attempt + 1)))
        raise TimeoutError(f"converge lock of {model} busy")

    async def converge(
        self,
        model: str,
        scale: ScaleUp | None = None,
        arrivals: Sequence[float] = (),
    ) -> tuple[list[PlacementItem], ModelSpec | None]:
        """Bring one model's instances to its desired replicas (under the model's converge lock), applying
        ``scale`` (its latest scale command) first.

        Returns the placement items to request (new replicas, and PENDING ones whose request may have
        been lost) and the model's spec; the caller publishes them. ``arrivals`` are the times the scale
        events that asked for new replicas entered the bus (for latency accounting).
        """
        now = self.clock()
        token = await self._lock(model)
        try:
            spec_now = (scale.spec if scale else None) or self.specs.get(model) or await self.store.model(model)
            if spec_now is None:
                return [], None
            # The same atomic step as the lock-free path (scale command, then any missing replicas),
            # fenced by our token.
            step = dataclasses.replace(scale or ScaleUp(model=model), created_at=now, lock_token=token)
            (res,) = await self.store.converge_up([step], ACTIVE)
            if res.status == "busy":
                raise TimeoutError(f"lost the converge lock of {model}")
            if res.applied and step.replicas is not None:
                event = ModelEvent(model=model, replicas=step.replicas, spec=step.spec)
                await self.bus.publish(subjects.EVENT_MODEL, ModelEvents(events=(event,)))
            created = list(res.created)
            removed: set[str] = set()
            if res.status == "down":  # scale-down: the full records are needed to rank and drain
                instances = await self.store.instances(model)
                placed = [i for i in instances if i.state in ACTIVE and i.worker is not None]
                ranked = scale_down_order(self.snapshot, spec_now, now, self.profile, instances=placed)
                plan = plan_scale(res.desired, instances, [e.instance_id for e in ranked])
                removed = set(plan.remove)
                await self._remove(model, token, [i for i in instances if i.id in removed], now)
                created = [
                    Instance(id=f"{model}-{secrets.token_hex(5)}", model=model, created_at=now)
                    for _ in range(plan.create)
                ]
                if created and not await self.store.create_pending(model, token, created):
                    raise TimeoutError(f"lost the converge lock of {model}")
            await self._publish_instances(created)
            again = [i for i in res.unrequested if i not in removed and self._needs_request(i, now)]
            items = [
                PlacementItem(instance_id=inst.id, model=model, requested_at=arrivals[min(k, len(arrivals) - 1)])
                if arrivals else PlacementItem(instance_id=inst.id, model=model, requested_at=now)
                for k, inst in enumerate(created)
            ]
            items += [PlacementItem(instance_id=i, model=model, requested_at=now) for i in again]
            return items, spec_now
        finally:
            await self.store.unlock_model(model, token)

    def _needs_request(self, iid: str, now: float) -> bool:
        # A PENDING replica without a reason is in flight, unless this process has not requested it
        # recently (e.g. a predecessor crashed mid-converge). Those with a reason wait for a cluster change.
        last = self.requested.get(iid)
        return last is None or now - last > 3 * self.settings.ack_wait_s

    async def _remove(self, model: str, token: str, victims: Sequence[Instance], now: float) -> None:
        pending = [i.id for i in victims if i.state is InstanceState.PENDING]
        placed = [i for i in victims if i.state is not InstanceState.PENDING]
        if pending:
            await self.store.release(pending)
            await self._publish_removed([i for i in victims if i.id in set(pending)])
        if placed:
            ids = [i.id for i in placed]
            await self.store.mark_state(model, token, InstanceState.DRAINING, ACTIVE, ids)
            await self.store.mark_drains(ids, now)
            drained = [msgspec.structs.replace(i, state=InstanceState.DRAINING) for i in placed]
            await self._publish_instances(drained)
            for inst in placed:
                assert inst.worker is not None
                await self.bus.publish(subjects.worker_drain(inst.worker), DrainInstance(instance_id=inst.id))

    async def converge_and_request(self, models: Sequence[str]) -> None:
        """Converge several models and publish their placement requests together."""
        items: list[PlacementItem] = []
        specs: dict[str, ModelSpec] = {}
        now = self.clock()
        slow = await self.converge_fast([ScaleUp(model=m, created_at=now) for m in models], {}, items, specs)
        for model in slow:
            got, spec = await self.converge(model)
            items += got
            if spec is not None:
                specs[model] = spec
        if items:
            await self.publish_items(items, specs, self.clock())

    async def publish_items(self, items: Sequence[PlacementItem], specs: dict[str, ModelSpec], now: float) -> None:
        """Chunk items into PlacementRequests, each under a fresh batch id.

        Re-requesting the same replicas (after a crash, a refusal or a cluster change) must never be
        swallowed by JetStream's duplicate window, so the id is random; duplicates that do reach the
        pipeline are harmless (the commit recognises them). Downstream stages derive their ids from the
        batch id, so a redelivered stage input is deduplicated.
        """
        size = self.settings.batch_max
        out = []
        for start in range(0, len(items), size):
            chunk = tuple(items[start : start + size])
            batch_id = secrets.token_hex(12)
            models = {i.model for i in chunk}
            req = PlacementRequest(batch_id=batch_id, items=chunk, specs={m: specs[m] for m in models})
            out.append((subjects.PLACEMENT_REQUESTED, req, f"req:{batch_id}"))
            for i in chunk:
                self.requested[i.instance_id] = now
        await self.bus.publish_js_many(out)

    # ================================================================ commits

    async def handle_scored(self, batch: Sequence[PlacementScored]) -> None:
        """Commit every decision of the batch with one Lua call; re-place refused ones; record PENDING."""
        now = self.clock()
        specs: dict[str, ModelSpec] = {}
        for scored in batch:
            specs.update(scored.specs)
        decided: list[tuple[ItemOutcome, CommitItem]] = []
        unplaced: list[ItemOutcome] = []
        retries: list[PlacementItem] = []
        back: list[Instance] = []  # PENDING again: one event message at the end, not one each
        for scored in batch:
            for out in scored.outcomes:
                if out.decision is not None:
                    decided.append((out, CommitItem(self._record(out))))
                elif out.retry:  # candidates went stale in flight: like a refused commit, place again
                    why = out.unschedulable.message if out.unschedulable else ""
                    await self._refused(out.item, why, retries, back, now)
                else:
                    unplaced.append(out)
        verdicts = await self.store.commit([c for _, c in decided])
        committed: list[tuple[ItemOutcome, Instance]] = []
        for (out, item), verdict in zip(decided, verdicts, strict=True):
            if verdict == "ok":
                committed.append((out, item.instance))
            elif verdict == "dup":
                stored = await self.store.instance(item.instance.id)
                if stored is not None and stored.worker is not None:
                    await self._assign(stored, specs.get(stored.model) or self.specs.get(stored.model))
            elif verdict.startswith("full:"):
                await self._refused(out.item, verdict, retries, back, now)
        for _, inst in committed:
            await self._assign(inst, specs.get(inst.model) or self.specs.get(inst.model))
            self.seen_placed[inst.id] = now
        await self._publish_instances([inst for _, inst in committed])
        decisions = tuple(
            DecisionEvent(
                instance_id=inst.id, model=inst.model, worker=inst.worker or "", gpu_indexes=inst.gpu_indexes,
                score=out.decision.score if out.decision else 0.0,
                breakdown=out.decision.breakdown if out.decision else {}, attempt=out.item.attempt,
                latency_ms=(now - out.item.requested_at) * 1000.0, at=now,
            )
            for out, inst in committed
        )
        for start in range(0, len(decisions), EVENTS_PER_MESSAGE):  # NATS messages are bounded
            chunk = decisions[start : start + EVENTS_PER_MESSAGE]
            await self.bus.publish(subjects.EVENT_DECISION, DecisionEvents(events=chunk))
        for out in unplaced:
            un = out.unschedulable
            await self._pending(out.item, un.message if un else "unschedulable", un, back, now)
        # Tells scoring replicas to drop any assumed placement of these replicas.
        await self._publish_instances(back)
        if retries:
            await asyncio.sleep(self.settings.commit_backoff_s * (2 ** min(r.attempt for r in retries)) / 2)
            known = {**self.specs, **specs}
            await self.publish_items(retries, {r.model: known[r.model] for r in retries}, self.clock())

    async def _refused(
        self, item: PlacementItem, why: str, retries: list[PlacementItem], back: list[Instance], now: float
    ) -> None:
        """A decision that could not be committed: re-place with fresh state (bounded), else PENDING.

        Either way the replica is PENDING again: its record joins ``back``."""
        cfg = self.settings
        step = after_refusal(item.attempt, why, cfg.commit_retries, cfg.commit_backoff_s)
        if isinstance(step, GiveUp):
            await self._pending(item, step.reason, None, back, now)
        else:
            retries.append(msgspec.structs.replace(item, attempt=step.attempt))
            back.append(Instance(id=item.instance_id, model=item.model, state=InstanceState.PENDING))

    def _record(self, out: ItemOutcome) -> Instance:
        d = out.decision
        assert d is not None
        c = d.candidate
        return Instance(
            id=out.item.instance_id, model=out.item.model, state=InstanceState.SCHEDULED, worker=c.worker,
            gpu_indexes=c.gpu_indexes, vram_claims=c.vram_claims, ram_claim=c.ram_claim,
            subordinates=c.subordinates, total_layers=c.total_layers, offload_layers=c.offload_layers,
            created_at=out.item.requested_at,
        )

    async def _assign(self, inst: Instance, spec: ModelSpec | None) -> None:
        assert inst.worker is not None
        source = (spec.source or spec.name) if spec else inst.model
        cmd = AssignInstance(
            instance_id=inst.id, model=inst.model, source=source, gpu_indexes=inst.gpu_indexes,
            vram_claims=inst.vram_claims,
        )
        await self.bus.publish(subjects.worker_assign(inst.worker), cmd)

    async def _pending(self, item: PlacementItem, reason: str, un: object, back: list[Instance], now: float) -> None:
        """Keep an unplaceable replica PENDING with ``reason`` (its record joins ``back``) and say why."""
        inst = await self.store.instance(item.instance_id)
        if inst is None or inst.state is not InstanceState.PENDING:
            return
        await self.store.set_reasons({item.instance_id: reason})
        back.append(Instance(id=item.instance_id, model=item.model, state=InstanceState.PENDING, reason=reason))
        if self.last_change > self.requested.get(item.instance_id, item.requested_at):
            self.changed = True  # the verdict may predate a change we already saw: retry on the next tick
        u = un if isinstance(un, Unschedulable) else None
        await self.bus.publish(
            subjects.EVENT_UNSCHEDULABLE,
            UnschedulableEvent(
                instance_id=item.instance_id, model=item.model, message=reason,
                reasons=u.reasons if u else (), filters=u.filters if u else (), at=now,
            ),
        )

    async def _publish_instances(
        self, instances: Iterable[Instance], removed: bool = False, subject: str = subjects.EVENT_INSTANCE
    ) -> None:
        now = self.clock()
        events = [InstanceEvent(instance=inst, removed=removed, at=now) for inst in instances]
        for start in range(0, len(events), EVENTS_PER_MESSAGE):  # NATS messages are bounded
            batch = tuple(events[start : start + EVENTS_PER_MESSAGE])
            await self.bus.publish(subject, InstanceEvents(events=batch))

    async def _publish_removed(self, instances: Iterable[Instance]) -> None:
        await self._publish_instances(instances, removed=True)

    # ================================================================ status

    async def handle_status(self, batch: Sequence[InstanceStatus]) -> None:
        """Apply workers' instance reports: state changes, idle drains, deletion confirmations.

        The ledger script checks the reporting worker and only moves states forward, so reports that
        arrive late or out of order (several consumers) are ignored rather than applied.
        """
        changes = [st for st in batch if not (st.deleted or st.idle)]
        for st in batch:
            if st.deleted or st.idle:
                known = await self.store.instance(st.instance_id)
                if known is None or known.worker != st.worker:
                    continue
                if st.deleted and known.state in (InstanceState.DRAINING, InstanceState.UNREACHABLE):
                    await self._delete([known], tell_worker=False)
                elif st.idle and known.state is InstanceState.DRAINING:
                    await self._delete([known], tell_worker=True)
        prevs = await self.store.set_states([(st.instance_id, st.worker, st.state) for st in changes])
        moved: list[tuple[str, Instance]] = []  # (subject, record), in report order
        for st, prev in zip(changes, prevs, strict=True):
            if prev is None:
                continue
            cached = self.feed.instances.get(st.instance_id)
            record = cached if cached is not None and cached.worker == st.worker else None
            record = record or await self.store.instance(st.instance_id)
            if record is not None:
                progress = prev in ON_WORKER and st.state in ON_WORKER
                subject = subjects.EVENT_INSTANCE_PROGRESS if progress else subjects.EVENT_INSTANCE
                moved.append((subject, msgspec.structs.replace(record, state=st.state)))
        # Runs of one subject at a time, in report order: STARTING then ERROR of one instance must reach
        # followers of both subjects in that order.
        for subject, run in itertools.groupby(moved, key=lambda pair: pair[0]):
            await self._publish_instances([inst for _, inst in run], subject=subject)

    async def _delete(self, instances: Sequence[Instance], tell_worker: bool) -> None:
        ids = [i.id for i in instances]
        await self.store.release(ids)
        await self.store.forget_drains(ids)
        for inst in instances:
            self.seen_placed.pop(inst.id, None)
            self.requested.pop(inst.id, None)
            if tell_worker and inst.worker:
                await self.bus.publish(subjects.worker_delete(inst.worker), DeleteInstance(instance_id=inst.id))
        await self._publish_removed(instances)

    # ================================================================ periodic checks

    async def _tick_loop(self) -> None:
        interval = self.settings.reconcile_interval_s
        while True:
            await asyncio.sleep(interval)
            # The tick number comes from the clock, not a local counter: the tick lock moves between
            # replicas, and every worker's resync shard and the full converge must still come round.
            n = int(self.clock() / interval)
            try:
                if await self.store.try_lock("tick", interval * 0.9):
                    await self.tick(full=n % FULL_EVERY == 0, resync_shard=n % RESYNC_SHARDS)
            except Exception:
                log.exception("reconciler tick failed")

    async def tick(self, full: bool = False, resync_shard: int | None = None) -> None:
        """Liveness, drain timeouts, level-triggered resync (of the workers in ``resync_shard`` of
        ``RESYNC_SHARDS``, or of all), PENDING retries on cluster change; ``full`` also re-converges every
        model."""
        now = self.clock()
        s = self.settings
        feed = self.feed
        instances = dict(feed.instances)  # as of now: the awaits below let events change the feed's
        # Only instances on silent workers can be lost: look at those, not at every instance.
        silent = silent_workers(feed.on_worker, feed.last_seen, now, s.not_ready_after_s, s.reschedule_after_s)
        suspects = sorted({i for w in silent for i in feed.on_worker.get(w, ()) if i in instances})
        lost = unreachable_instances(
            [instances[i] for i in suspects], feed.last_seen, now, s.not_ready_after_s, s.reschedule_after_s
        )
        if lost:
            await self.store.release(lost, mode=InstanceState.UNREACHABLE.value)
            moved = [msgspec.structs.replace(instances[i], state=InstanceState.UNREACHABLE) for i in lost]
            await self._publish_instances(moved)
            log.warning("replacing %d instances of lost workers", len(lost))
            await self.converge_and_request(sorted({instances[i].model for i in lost}))
        # Back from the dead: forget the stale copies (their claims were released already).
        unreachable = [instances[i] for i in sorted(feed.unreachable) if i in instances]
        stale = [i for i in unreachable if i.worker and self.snapshot.state(i.worker, now) is WorkerState.READY]
        if stale:
            await self._delete(stale, tell_worker=True)
        drains = await self.store.drains()
        done = [
            instances[i] for i, t in drains.items()
            if i in instances and drain_finished(t, False, now, s.drain_timeout_s)
        ]
        if done:
            await self._delete(done, tell_worker=True)
        await self._resync(instances, now, resync_shard)
        if self.changed:
            # Retry now, and once more a tick or two later: other services may learn of the change (a worker
            # joined) a moment after we do, and a verdict from their older snapshot must not stick.
            self.changed = False
            self.retry_again_at = now + max(1.0, 2 * self.settings.reconcile_interval_s)
            await self.retry_pending(instances)
        elif self.retry_again_at and now >= self.retry_again_at:
            self.retry_again_at = 0.0
            await self.retry_pending(instances)
        if full:
            await self.converge_and_request(sorted((await self.store.desired()).keys()))

    async def _resync(self, instances: dict[str, Instance], now: float, shard: int | None) -> None:
        feed = self.feed
        reported = {
            w: hb.instances for w, hb in feed.usage.items()
            if (shard is None or resync_shard_of(w) == shard)
            and self.snapshot.state(w, now) is WorkerState.READY
        }
        # A worker that reports exactly the instances placed on it needs no repair: compare the others only.
        off = {w: ids for w, ids in reported.items() if set(ids) != feed.running_on.get(w, set())}
        mine = {i: instances[i] for w in off for i in feed.on_worker.get(w, ()) if i in instances}
        for iid, inst in mine.items():
            if inst.state in ON_WORKER:
                self.seen_placed.setdefault(iid, now)
        grace = max(2.0, 3 * self.settings.heartbeat_interval_s)
        fix = resync_workers(mine, off, self.seen_placed, now, grace)
        for iid in fix.assign:
            inst = instances[iid]
            await self._assign(inst, self.specs.get(inst.model))
        for worker, iid in fix.delete:
            with contextlib.suppress(Exception):
                await self.bus.publish(subjects.worker_delete(worker), DeleteInstance(instance_id=iid))

    async def retry_pending(self, instances: dict[str, Instance]) -> None:
        """Re-request every PENDING replica that has a reason (the cluster changed since)."""
        by_model: dict[str, list[Instance]] = defaultdict(list)
        for inst in instances.values():
            if inst.state is InstanceState.PENDING and inst.reason:
                by_model[inst.model].append(inst)
        if not by_model:
            return
        now = self.clock()
        items: list[PlacementItem] = []
        specs: dict[str, ModelSpec] = {}
        for model, pend in sorted(by_model.items()):
            spec = self.specs.get(model) or await self.store.model(model)
            if spec is None:
                continue
            specs[model] = spec
            items += [PlacementItem(instance_id=i.id, model=model, requested_at=now) for i in pend]
        await self.publish_items(items, specs, now)
