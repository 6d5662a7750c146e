"""The reconciler: owns desired vs actual.

Consumes scale/cordon commands, scored placement outcomes and instance status (JetStream), and worker
reports (core NATS, written to Redis in batches by its state writer). Commits decisions with the
ledger's atomic compare-and-set, re-places refused ones, drains and deletes on scale-down, replaces
instances of lost workers and retries PENDING replicas when the cluster changes. Every decision it
takes comes from the pure core: the reconcile planner (``shared.core.placement.planner``) says what to do
after every commit batch, status batch, scale-down and tick, and this module gathers its inputs and applies
its plans over NATS and Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import secrets
import time
import zlib
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.errors import NotJSMessageError

from services.reconciler.contract import CONSUMES, EMITS
from services.reconciler.writer import StateWriter
from shared.bus import streams, subjects
from shared.bus.messages import (
    AssignInstance,
    AssignInstances,
    CordonCommand,
    CordonEvent,
    DecisionEvent,
    DecisionEvents,
    DeleteInstance,
    DrainInstance,
    InstanceEvent,
    InstanceEvents,
    InstanceReports,
    InstanceStatus,
    ItemOutcome,
    MessageError,
    ModelEvent,
    ModelEvents,
    PlacementItem,
    PlacementRequest,
    PlacementScored,
    RemoveWorkerCommand,
    ScaleCommand,
    UnschedulableEvent,
    WorkerRemovedEvent,
    decode,
)
from shared.bus.pull import in_stream_order
from shared.bus.runtime import Publish, StreamFull, TooLarge
from shared.bus.subjects import INSTANCE_STATUS_WORKER_TOKEN as INSTANCE_STATUS_TOKEN
from shared.bus.validate import bad_worker_name, check_scale, impersonation
from shared.core.placement import scale_down_order
from shared.core.placement.domain import Instance, InstanceState, ModelSpec, Unschedulable, WorkerState
from shared.core.placement.lifecycle import ACTIVE, ON_WORKER, current_spec, instance_from_decision
from shared.core.placement.planner import (
    Ask,
    Book,
    Cluster,
    Commit,
    Failure,
    PendingRetry,
    Plan,
    Report,
    Restarts,
    Timings,
    Want,
    needs_request,
    overdue_pending,
    plan,
    remove_worker,
)
from shared.core.placement.reconcile import deletes_due, resync_workers
from shared.host.feed import Feed
from shared.host.isolation import Retry
from shared.host.service import PlacementService, ack_all, guarded, run_batch, settle
from shared.state.store import CommitItem, ScaleUp, commit_call

log = logging.getLogger("gantry.reconciler")
DELETE_RESEND_S = 30.0  # a resync's delete of one instance on one worker is sent again after this long
MAX_DELETES_PER_RESYNC = 256  # deletes one resync sends one worker
# Each tick resyncs one shard of the workers (their reported instances against the ledger), so every
# worker is compared once per RESYNC_SHARDS ticks and no tick compares them all: at thousands of
# instances a full pass holds the event loop for milliseconds.
RESYNC_SHARDS = 5
FULL_EVERY = 10  # ticks between full re-converges of every model
EVENTS_PER_MESSAGE = 1000  # instance changes or decisions per events message (well under 1 MB)
NOT_REFUSED = frozenset({"ok", "dup", "gone", "unschedulable"})  # other commit verdicts: refused, placed again
UNANSWERED_KEPT = 4096  # decisions of failed commits whose names are kept for their retry (the oldest go first)
PIPELINE_FULL = "not requested: the placement pipeline is full (back-pressure); requested again later"
TOO_LARGE = ("not requested: its placement request is larger than the pipeline's stream holds (GANTRY_PIPE_MAX_BYTES); "
             "requested again later")


def resync_shard_of(worker: str) -> int:
    """The tick shard (of ``RESYNC_SHARDS``) that resyncs ``worker``: stable across processes."""
    return zlib.crc32(worker.encode()) % RESYNC_SHARDS


class Reconciler(PlacementService):
    """Desired-state loop and commit point of the placement pipeline."""

    name = "reconciler"
    consumes = CONSUMES
    emits = EMITS
    observes_stage = False  # the SLI is observed at the commit (_observe_commits), not per scored batch
    # Its own events come back through the bus (``hears_itself``), in the server's order with other replicas'
    # events: applied locally as sent, a removal could be overtaken by another replica's older RUNNING report
    # still in flight, which would put the removed instance back in this replica's snapshot.

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.specs: dict[str, ModelSpec] = {}
        self.requested: dict[str, float] = {}  # instance id -> when this process last requested it
        self.seen_placed: dict[str, float] = {}  # instance id -> when first seen committed
        self._deletes_sent: dict[tuple[str, str], float] = {}  # (worker, instance) -> when a resync last deleted it
        # Decisions whose commit call failed outright (its replies all lost: it may have landed) -> the names that
        # call gave them, for the batch's redelivery to send again (``_named``); bounded by UNANSWERED_KEPT.
        self.unanswered: dict[Instance, list[str]] = {}
        self.last_change = float("-inf")
        self.listening_since = float("-inf")  # set at start: heartbeats before it went unheard here
        # since when the pipeline refuses placement requests (None: it takes them); logged once an episode
        self.refused_since: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # When the command stream was created (its epoch, unix s) and the highest sequence heard of it: a command of
        # a stream created again (sequence restarted) wins by its epoch, never by its own stream time, which a clock
        # step or a leader change to a lagging node makes older than an earlier command's (``_command_epoch``).
        self._cmd_epoch: float | None = None
        self._cmd_highest = 0
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.writer = StateWriter(self)

    def feeds(self) -> Feed:
        """Instance claims and the states its plans read; file readiness goes to Redis through the state writer's
        own subscription, not into this snapshot.

        Not start-up progress (SCHEDULED → STARTING → RUNNING, ``Feed.PROGRESS``): every set the planner and the
        resync read (``lifecycle``: ON_WORKER, HOLDS_GPUS, ACTIVE) holds those three states alike, and scale-down
        ranks the store's records (``converge``), not this snapshot's. Following them cost every placement two
        more instance events to decode and apply here (one per report, the reconciler's own, echoed back).
        """
        return Feed.CLAIMS

    def consumers(self) -> Sequence[tuple[str, str, str]]:
        """Commands, scored outcomes and instance status."""
        return (
            (streams.STREAM_CMD, streams.CONSUMER_SCALE, subjects.CMD_ALL),
            (streams.STREAM_SCORED, streams.CONSUMER_COMMIT, subjects.PLACEMENT_SCORED),
            (streams.STREAM_STATUS, streams.CONSUMER_STATUS, subjects.INSTANCE_STATUS),
        )

    def register(self) -> None:
        """Pull loops for the three consumers."""

        async def on_commands(raws: list[Msg]) -> None:
            await self.handle_commands(raws)

        async def on_scored(raws: list[Msg]) -> None:
            await self.consume(raws, PlacementScored, subjects.PLACEMENT_SCORED, self.handle_scored)

        async def on_status(raws: list[Msg]) -> None:
            honest: list[tuple[tuple[InstanceStatus, ...], Msg]] = []
            for raw in raws:
                try:
                    reports = await self._status_reports(raw)
                except Exception as exc:  # never expected (decode reports everything as MessageError): isolate
                    await settle(self, subjects.INSTANCE_STATUS, [raw], exc)
                    continue
                if reports is None:
                    await raw.term()
                    continue
                sender = subjects.reporting_worker(raw.subject, INSTANCE_STATUS_TOKEN)
                forged = next((why for st in reports if (why := impersonation(st.worker, sender))), "")
                if forged:  # a worker may report only on its own instances' subject
                    await self.bus.dead_letter(subjects.INSTANCE_STATUS, forged, raw.data)
                    await raw.term()
                else:
                    honest.append((reports, raw))
            if honest:
                await run_batch(
                    self, subjects.INSTANCE_STATUS, [r for _, r in honest],
                    lambda: self.handle_status([st for reports, _ in honest for st in reports]),
                )

        self.pull(streams.STREAM_CMD, streams.CONSUMER_SCALE, subjects.CMD_ALL, on_commands,
                  linger=self.settings.command_linger_s)
        self.pull(streams.STREAM_SCORED, streams.CONSUMER_COMMIT, subjects.PLACEMENT_SCORED, on_scored)
        # Status reports (several per placement) are not on the placement path: batch them up.
        self.pull(streams.STREAM_STATUS, streams.CONSUMER_STATUS, subjects.INSTANCE_STATUS, on_status,
                  linger=self.settings.status_linger_s)

    async def _status_reports(self, raw: Msg) -> tuple[InstanceStatus, ...] | None:
        """A status message's reports (several, or a lone ``InstanceStatus``); None after dead-lettering why it
        is neither."""
        try:
            return decode(raw.data, InstanceReports).reports
        except MessageError as batch_error:
            try:
                return (decode(raw.data, InstanceStatus),)
            except MessageError as single_error:  # why, in the words of the shape it was meant to have
                why = batch_error if b'"reports"' in raw.data else single_error
                await self.bus.dead_letter(subjects.INSTANCE_STATUS, str(why), raw.data)
                return None

    async def started(self) -> None:
        """Load specs, listen for cluster changes, start the state writer and the periodic checks."""
        # Heartbeats are subscribed to by now; the seen times loaded from Redis may be stale (this process's
        # writer stores them), so silence is counted from here at the earliest.
        self.listening_since = self.clock()
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
        self.last_change = self.clock()

    # ================================================================ planner inputs

    def timings(self) -> Timings:
        """The planner's view of the settings."""
        s = self.settings
        return Timings(
            not_ready_after=s.not_ready_after_s, reschedule_after=s.reschedule_after_s,
            drain_timeout=s.drain_timeout_s, forget_after=s.forget_after_s, commit_retries=s.commit_retries,
            commit_backoff=s.commit_backoff_s, pending_retry=s.pending_retry_s,
            pending_retry_max=s.pending_retry_max_s,
        )

    def cluster(self) -> Cluster:
        """Worker liveness and the latest cluster change, as this process's feed knows them: a read-only view of
        the feed's last-seen times (no copy of a thousand entries per commit batch), so a plan is made from it
        right away, before the next await lets heartbeats move them."""
        feed = self.feed
        return Cluster(
            last_seen=MappingProxyType(feed.last_seen),
            cordoned=frozenset(c for c in feed.cordons if ":" not in c),
            changed_at=self.last_change,
            listening_since=self.listening_since,
        )

    async def spec_of(self, model: str, command: ModelSpec | None = None) -> ModelSpec | None:
        """The model's current spec (``lifecycle.current_spec``'s one precedence; Redis read only if needed)."""
        spec = current_spec(command, self.specs.get(model))
        return spec if spec is not None else current_spec(stored=await self.store.model(model))

    async def _stored_spec(self, model: str, commanded: ModelSpec) -> ModelSpec:
        """The model's spec after the store refused a scale command as older than the one it applied last (a
        redelivery): the stored one, not the refused command's, which ``_valid_scale`` cached (and now caches)."""
        self.specs.pop(model, None)
        stored = await self.spec_of(model)
        if stored is None:
            return commanded
        self.specs[model] = stored
        return stored

    # ================================================================ commands

    async def _command_stream_created(self) -> float:
        """When the command stream was created (unix s; 0.0 when NATS does not say)."""
        info = await self.bus.nc.jetstream().stream_info(streams.STREAM_CMD)
        return info.created.timestamp() if info.created is not None else 0.0

    async def _command_epoch(self, raws: Sequence[Msg]) -> float:
        """The epoch (creation time) of the stream ``raws`` come from, read again when one of them is lower in
        sequence than any heard before (a redelivery, or a stream created again). When it cannot be read this raises:
        the batch is redelivered (a command judged by an epoch it may not have would be acked unapplied)."""
        try:
            seqs = [m.metadata.sequence.stream for m in raws]
        except NotJSMessageError:  # not from JetStream (as ``in_stream_order``): no stream, no epoch
            return 0.0
        if not seqs:
            return self._cmd_epoch or 0.0
        if self._cmd_epoch is None or min(seqs) < self._cmd_highest:
            created = await self._command_stream_created()
            if created != self._cmd_epoch:
                self._cmd_epoch, self._cmd_highest = created, 0
        self._cmd_highest = max(self._cmd_highest, *seqs)
        return self._cmd_epoch or 0.0

    async def handle_commands(self, raws: list[Msg]) -> None:
        """A pulled batch of commands, handled in stream order (``in_stream_order``: a redelivered command can arrive
        behind newer ones, and the last command of a model must be its newest).

        Scale commands for one model are coalesced: the last one sets the desired replicas and one
        converge creates every missing replica; the placement requests of the whole batch travel
        together. Invalid commands are dead-lettered. If the batch's one-call converge fails, every
        command of the batch is redelivered; if a model's locked converge (scale-down) fails, that
        model's commands are.
        """
        scales: dict[str, list[tuple[Msg, ScaleCommand, float]]] = {}
        epoch = await self._command_epoch(raws)
        for raw in in_stream_order(raws):
            if raw.subject == subjects.CORDON:
                await guarded(self, raw.subject, [raw], functools.partial(self._cordon, raw.data, raw, epoch))
                continue
            if raw.subject == subjects.REMOVE_WORKER:
                await guarded(self, raw.subject, [raw], functools.partial(self._remove_worker, raw.data, raw))
                continue
            cmd = await self._valid_scale(raw)
            if cmd is not None:
                meta = raw.metadata
                arrived = meta.timestamp.timestamp() if meta.timestamp else self.clock()
                scales.setdefault(cmd.model, []).append((raw, cmd, arrived))
        now = self.clock()
        wanted = {
            model: ScaleUp(model=model, replicas=cmds[-1][1].replicas, spec=self.specs[model],
                           seq=cmds[-1][0].metadata.sequence.stream, at=epoch, created_at=now)
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
            spec = await self.spec_of(w.model, w.spec)
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
            if not res.applied and up.replicas is not None:
                known[res.model] = await self._stored_spec(res.model, known[res.model])
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
        known = await self.spec_of(cmd.model)
        reason = check_scale(cmd, known)
        if reason:
            await self.bus.dead_letter(raw.subject, reason, raw.data)
            await raw.ack()
            return None
        spec = current_spec(cmd.spec, known)
        assert spec is not None
        self.specs[cmd.model] = msgspec.structs.replace(spec, replicas=cmd.replicas)
        return cmd

    async def _cordon(self, data: bytes, raw: Msg, epoch: float) -> None:
        cmd = await self.bus.decode_or_reject(raw.subject, data, CordonCommand)
        if cmd is None:
            await raw.ack()
            return
        reason = bad_worker_name(cmd.worker)
        inventory = self.feed.inventory.get(cmd.worker)
        if reason or inventory is None:
            why = reason or f"cordon: unknown worker {cmd.worker!r}"
        elif cmd.gpu_index is not None and cmd.gpu_index not in {g.index for g in inventory.gpus}:
            why = f"cordon: worker {cmd.worker} has no GPU {cmd.gpu_index}"
        else:
            why = ""
        if why:
            await self.bus.dead_letter(raw.subject, why, data)
            await raw.ack()
            return
        if not await self.store.set_cordon(cmd.worker, cmd.cordoned, cmd.gpu_index, raw.metadata.sequence.stream,
                                           epoch):
            # a redelivery (its ack wait ran out) behind a newer cordon command of the same worker or GPU
            log.info("cordon of %s (GPU %s) to %s ignored: a newer command was applied", cmd.worker, cmd.gpu_index,
                     cmd.cordoned)
            await raw.ack()
            return
        event = CordonEvent(worker=cmd.worker, cordoned=cmd.cordoned, gpu_index=cmd.gpu_index)
        await self.bus.publish(subjects.EVENT_CORDON, event)
        await raw.ack()

    async def _remove_worker(self, data: bytes, raw: Msg) -> None:
        """``gantry workers remove``: the core says whether and what; a refusal is dead-lettered with why."""
        cmd = await self.bus.decode_or_reject(raw.subject, data, RemoveWorkerCommand)
        if cmd is None:
            await raw.ack()
            return
        now = self.clock()
        bad = bad_worker_name(cmd.worker)
        # A worker no snapshot holds may still be stored under a record that breaks today's limits: clearing it is
        # what the operator asks for (the check reads Redis only then).
        invalid = not bad and cmd.worker not in self.feed.last_seen and bool(
            await self.store.invalid_workers([cmd.worker])
        )
        step = bad or remove_worker(cmd.worker, list(self.feed.instances.values()), self.cluster(), now,
                                    self.timings(), invalid_record=invalid)
        if isinstance(step, str):
            await self.bus.dead_letter(raw.subject, f"workers remove: {step}", data)
            await raw.ack()
            return
        records = [self.feed.instances[i] for i in step.forget if i in self.feed.instances]
        await self._delete(records, tell_worker=False)
        outcome = await self.store.forget_worker(cmd.worker, cutoff=now - self.settings.not_ready_after_s)
        if outcome == "holds":  # a commit raced the release: redeliver and try again
            raise Retry(f"worker {cmd.worker} still holds claims")
        if outcome == "alive":
            await self.bus.dead_letter(raw.subject, f"workers remove: worker {cmd.worker} came back", data)
        else:
            await self._announce_removed(cmd.worker, "removed by an operator")
            await self.converge_and_request(list(step.models))
        await raw.ack()

    async def _announce_removed(self, worker: str, reason: str) -> None:
        self.feed.on_worker_removed(worker)
        await self.bus.publish(subjects.EVENT_WORKER_REMOVED, WorkerRemovedEvent(worker=worker, reason=reason))

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
            spec_now = await self.spec_of(model, scale.spec if scale else None)
            if spec_now is None:
                return [], None
            # The same atomic step as the lock-free path (scale command, then any missing replicas),
            # fenced by our token.
            step = dataclasses.replace(scale or ScaleUp(model=model), created_at=now, lock_token=token)
            (res,) = await self.store.converge_up([step], ACTIVE)
            if res.status == "busy":
                raise TimeoutError(f"lost the converge lock of {model}")
            if not res.applied and step.replicas is not None:
                spec_now = await self._stored_spec(model, spec_now)
            if res.applied and step.replicas is not None:
                event = ModelEvent(model=model, replicas=step.replicas, spec=step.spec)
                await self.bus.publish(subjects.EVENT_MODEL, ModelEvents(events=(event,)))
            created = list(res.created)
            removed: set[str] = set()
            if res.status == "down":  # scale-down: the full records are needed to rank and drain
                instances = await self.store.instances(model)
                placed = [i for i in instances if i.state in ACTIVE and i.worker is not None]
                ranked = scale_down_order(self.snapshot, spec_now, now, self.profile, instances=placed)
                want = Want(replicas=res.desired, restart=spec_now.restart,
                            removal_order=tuple(e.instance_id for e in ranked))
                # Only the scale part is applied under the lock; the rest of this plan (liveness, drains,
                # failures) is the tick's, which plans it again from the same state.
                p = plan({model: want}, instances, self.cluster(), (), now, Book(), self.timings())
                removed = set(p.remove) | set(p.drain)
                by_id = {i.id: i for i in instances}
                await self._remove(model, token, [by_id[i] for i in p.remove], [by_id[i] for i in p.drain], now)
                created = [
                    Instance(id=f"{model}-{secrets.token_hex(5)}", model=model, created_at=now)
                    for _ in range(p.create.get(model, 0))
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

    async def _same_model(self, out: ItemOutcome) -> ItemOutcome:
        """``out``, or, for a decision naming another model than its replica's (a scoring bug or a forged
        message: committed, it would count in the wrong model's replicas for good), a dead letter and the replica
        placed again."""
        d = out.decision
        if d is None or d.model == out.item.model:
            return out
        why = f"a decision for model {d.model!r} on replica {out.item.instance_id} of model {out.item.model!r}"
        await self.bus.dead_letter(subjects.PLACEMENT_SCORED, why, msgspec.json.encode(out))
        return ItemOutcome(item=out.item, retry=True)

    def _needs_request(self, iid: str, now: float) -> bool:
        return needs_request(self.requested.get(iid), now, 3 * self.settings.ack_wait_s)

    async def _remove(
        self, model: str, token: str, pending: Sequence[Instance], placed: Sequence[Instance], now: float
    ) -> None:
        """Remove PENDING replicas outright and drain placed ones (under the model's lock). Only what the store
        changed is announced: a PENDING replica committed since it was read stays placed (the next converge
        drains it if it is one too many), a placed one that failed meanwhile is not drained."""
        if pending:
            gone = set(await self.store.remove_pending([i.id for i in pending]))
            await self._publish_removed([i for i in pending if i.id in gone])
        if placed:
            moved = await self.store.mark_state(model, token, InstanceState.DRAINING, ACTIVE, [i.id for i in placed])
            if moved is None:
                raise TimeoutError(f"lost the converge lock of {model}")
            moved_ids = set(moved)
            draining = [i for i in placed if i.id in moved_ids]
            await self.store.mark_drains([i.id for i in draining], now)
            await self._publish_instances([msgspec.structs.replace(i, state=InstanceState.DRAINING) for i in draining])
            for inst in draining:
                assert inst.worker is not None
                await self.bus.publish(subjects.worker_drain(inst.worker), DrainInstance(instance_id=inst.id))

    async def converge_and_request(self, models: Sequence[str]) -> None:
        """Converge several models and publish their placement requests together."""
        if not models:
            return
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
        out: list[Publish] = []
        chunks: dict[str, tuple[PlacementItem, ...]] = {}
        for start in range(0, len(items), size):
            chunk = tuple(items[start : start + size])
            batch_id = secrets.token_hex(12)
            models = {i.model for i in chunk}
            req = PlacementRequest(batch_id=batch_id, items=chunk, specs={m: specs[m] for m in models})
            out.append((subjects.PLACEMENT_REQUESTED, req, f"req:{batch_id}"))
            chunks[f"req:{batch_id}"] = chunk
        refused: list[PlacementItem] = []
        oversize: list[PlacementItem] = []
        try:
            await self.bus.publish_js_many(out)
        except StreamFull as full:
            refused = [i for _, _, msg_id in full.rest for i in chunks[msg_id]]
            self._say_refused(full)
        except TooLarge as big:  # never stored, however far the pipeline drains: a reason of its own, not a stall
            oversize = [i for _, _, msg_id in big.rest for i in chunks[msg_id]]
            refused = [i for _, _, msg_id in big.full for i in chunks[msg_id]]
            log.error("placement requests of %d replica(s) not requested: %s", len(oversize), big)
            if refused:
                self._say_refused(StreamFull(big.full))
        else:
            self._say_accepted()
        # only once stored: marked before, a failed publish (the batch is redelivered) left the replicas "requested"
        # and unasked for three ack waits; a part that did go out is asked again, which the commit recognises
        left = {i.instance_id for i in (*refused, *oversize)}
        for i in items:
            if i.instance_id not in left:
                self.requested[i.instance_id] = now
        if refused:
            await self._not_requested(refused)
        if oversize:
            await self._not_requested(oversize, TOO_LARGE)

    async def _not_requested(self, items: Sequence[PlacementItem], reason: str = PIPELINE_FULL) -> None:
        """Replicas whose placement request the full pipeline refused: back-pressure at the entry point, not an error.
        Whatever asked for them goes on (a scale command is acked, a commit batch too: a full requests stream must
        not stop the last stage from draining). They wait PENDING with that reason, stored and announced, so the
        tick's PENDING retries (``planner._pending_retries``: the shared book's backoff, up to
        ``pending_retry_max_s``) request them again, whichever reconciler replica ticks."""
        states = await self.store.states([i.instance_id for i in items])
        fresh: dict[str, Instance] = {}
        for item in items:
            known = self.feed.instances.get(item.instance_id)
            if states.get(item.instance_id) is not InstanceState.PENDING or item.instance_id in fresh:
                continue  # placed or removed meanwhile
            if known is not None and known.state is InstanceState.PENDING:
                if known.reason != reason:  # else refused again: the reason is there already
                    fresh[item.instance_id] = msgspec.structs.replace(known, reason=reason)
            else:
                fresh[item.instance_id] = Instance(id=item.instance_id, model=item.model, state=InstanceState.PENDING,
                                                   reason=reason)
        if fresh:
            await self.store.set_reasons(dict.fromkeys(fresh, reason))
            await self._publish_instances(fresh.values())

    def _say_refused(self, full: StreamFull) -> None:
        """Log the first refusal of an episode only (every request is refused while the pipeline is full)."""
        if self.refused_since is None:
            self.refused_since = self.clock()
            log.warning("placement requests refused (%s): the replicas wait PENDING and are requested again later; "
                        "said again when requests go through", full)

    def _say_accepted(self) -> None:
        """Log the end of an episode of refusals."""
        if self.refused_since is not None:
            log.warning("placement requests go through again, after %.1f s of a full pipeline",
                        self.clock() - self.refused_since)
            self.refused_since = None

    async def request(self, asks: Sequence[Ask], now: float) -> None:
        """Publish the plan's placement requests (a model without a known spec cannot be requested)."""
        items: list[PlacementItem] = []
        specs: dict[str, ModelSpec] = {}
        for ask in asks:
            spec = specs.get(ask.model) or await self.spec_of(ask.model)
            if spec is None:
                continue
            specs[ask.model] = spec
            items.append(PlacementItem(instance_id=ask.instance_id, model=ask.model, requested_at=now,
                                       attempt=ask.attempt))
        if items:
            await self.publish_items(items, specs, now)

    # ================================================================ commits

    async def handle_scored(self, batch: Sequence[PlacementScored]) -> None:
        """Commit every decision of the batch with one Lua call, then apply the planner's verdicts: assign
        the committed, re-send redelivered ones, drop those gone, re-place refused ones, record PENDING."""
        now = self.clock()
        specs: dict[str, ModelSpec] = {}
        for scored in batch:
            specs.update(scored.specs)
        outs = [await self._same_model(out) for scored in batch for out in scored.outcomes]
        decided = self._named([
            (k, instance_from_decision(out.decision, out.item.instance_id, created_at=out.item.requested_at))
            for k, out in enumerate(outs) if out.decision is not None
        ])
        # Keyed by position, not instance id: a replica requested twice has two outcomes in a batch, and only the
        # first decision of it the ledger took is "ok" (the next is "dup").
        try:
            answers = await self.store.commit([c for _, c in decided])
        except Exception:  # Redis away (the batch comes back): the call may have landed, its names are kept
            self._unanswered([c for _, c in decided])
            raise
        ledger = dict(zip((k for k, _ in decided), answers, strict=True))
        verdicts = [_verdict(out, ledger.get(k, "")) for k, out in enumerate(outs)]
        # The shared retry book is read only for replicas that will wait (not on the path of a good commit).
        waiting = sorted({v.instance_id for v in verdicts if v.outcome not in ("ok", "dup", "gone")})
        if waiting:  # an outcome for a replica that is not PENDING (removed, or never existed: forged) is dropped
            states = await self.store.states(waiting)
            gone = {i for i in waiting if states.get(i) is not InstanceState.PENDING}
            # Only the waiting verdicts: the ledger's "ok" for the same replica in this batch stands (the replica
            # is not PENDING because that very commit placed it).
            verdicts = [dataclasses.replace(v, outcome="gone") if v.instance_id in gone
                        and v.outcome not in ("ok", "dup") else v for v in verdicts]
            waiting = [i for i in waiting if i not in gone]
        booked = await self.store.retries(waiting) if waiting else {}
        book = Book(retries={i: self._retry_of(i, booked, now) for i in waiting})
        p = plan({}, [], self.cluster(), verdicts, now, book, self.timings())
        by_id = {out.item.instance_id: out for out in outs}
        placed = [k for k, _ in decided if ledger[k] == "ok"]
        by_id.update({outs[k].item.instance_id: outs[k] for k in placed})  # the outcome the ledger took
        records = {c.instance.id: c.instance for k, c in decided if ledger[k] == "ok"}
        committed = [records[i] for i in p.committed]
        self._observe_commits([by_id[i.id] for i in committed], verdicts, now)
        await self._assign_all([(inst, specs.get(inst.model) or await self.spec_of(inst.model)) for inst in committed])
        for inst in committed:
            self.seen_placed[inst.id] = now
        resent: list[Instance] = []
        for iid in p.assign:  # a redelivered commit: the stored record is the one placed
            stored = await self.store.instance(iid)
            if stored is not None and stored.worker is not None:
                await self._assign(stored, specs.get(stored.model) or await self.spec_of(stored.model))
                resent.append(stored)
        # The placement's own event may have died with the process that committed it: said again, so that no
        # feed keeps the replica PENDING (this one's resync would take the re-sent replica for a stray and delete it).
        await self._publish_instances([*committed, *resent])
        await self._publish_decisions([(by_id[i.id], i) for i in committed], now)
        await self._book(p.retries)
        # PENDING again: tells scoring replicas to drop any assumed placement of these replicas.
        back = [Instance(id=a.instance_id, model=a.model, state=InstanceState.PENDING) for a in p.request]
        back += await self._pending(p.pending, by_id, now)
        await self._publish_instances(back)
        if p.request:
            await asyncio.sleep(p.request_delay())
            await self.request(p.request, self.clock())

    def _named(self, decided: Sequence[tuple[int, Instance]]) -> list[tuple[int, CommitItem]]:
        """Each decision as a commit item named for this call, or, for a decision of a commit call that failed
        outright here (the same record: a re-planned replica's decision differs), as that call named it: if that
        call did land, the ledger answers "ok" again for what it committed (its DecisionEvent, assignment and SLI
        are not lost to a "dup") and "dup" for anything else."""
        call = commit_call()
        out: list[tuple[int, CommitItem]] = []
        for n, (k, inst) in enumerate(decided):
            names = self.unanswered.get(inst) if self.unanswered else None
            by = f"{call}:{n}"
            if names:
                by = names.pop(0)
                if not names:
                    del self.unanswered[inst]
            out.append((k, CommitItem(inst, by=by)))
        return out

    def _unanswered(self, items: Sequence[CommitItem]) -> None:
        """Keep the names of a failed commit call's items for the retry of their batch (the oldest forgotten
        beyond UNANSWERED_KEPT: a batch redelivered to another replica, or given up, never comes back here)."""
        for it in items:
            self.unanswered.setdefault(it.instance, []).append(it.by)
        while len(self.unanswered) > UNANSWERED_KEPT:
            del self.unanswered[next(iter(self.unanswered))]

    def _observe_commits(self, committed: Sequence[ItemOutcome], verdicts: Sequence[Commit], now: float) -> None:
        """The placement SLI (scale event -> committed) and the commits the ledger refused."""
        self.metrics.stage_done((out.item.requested_at for out in committed), now)
        self.metrics.committed.labels(self.name).inc(len(committed))
        self.metrics.refused([v.outcome for v in verdicts if v.outcome not in NOT_REFUSED])

    def _retry_of(self, iid: str, stored: Mapping[str, tuple[int, float, float]], now: float) -> PendingRetry:
        known = stored.get(iid)
        if known is not None:
            return PendingRetry(*known)
        return PendingRetry(attempts=0, next_at=now, requested_at=self.requested.get(iid, float("-inf")))

    async def _book(self, retries: Mapping[str, PendingRetry]) -> None:
        """Write the plan's retry entries to the book every reconciler replica shares (Redis)."""
        await self.store.set_retries({i: (r.attempts, r.next_at, r.requested_at) for i, r in retries.items()})

    async def _publish_decisions(self, committed: Sequence[tuple[ItemOutcome, Instance]], now: float) -> None:
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

    async def _assign(self, inst: Instance, spec: ModelSpec | None) -> None:
        await self._assign_all([(inst, spec)])

    async def _assign_all(self, placed: Sequence[tuple[Instance, ModelSpec | None]]) -> None:
        """Tell each worker what to start: one message per worker (``AssignInstances`` when several)."""
        by_worker: dict[str, list[AssignInstance]] = {}
        for inst, spec in placed:
            assert inst.worker is not None
            source = (spec.source or spec.name) if spec else inst.model
            by_worker.setdefault(inst.worker, []).append(AssignInstance(
                instance_id=inst.id, model=inst.model, source=source, gpu_indexes=inst.gpu_indexes,
                vram_claims=inst.vram_claims,
            ))
        for worker, cmds in by_worker.items():
            msg = cmds[0] if len(cmds) == 1 else AssignInstances(instances=tuple(cmds))
            await self.bus.publish(subjects.worker_assign(worker), msg)

    async def _pending(
        self, reasons: Mapping[str, str], outs: Mapping[str, ItemOutcome], now: float
    ) -> list[Instance]:
        """Record why replicas stay PENDING (those still PENDING) and say so; their records, for the caller."""
        back: list[Instance] = []
        for iid, reason in reasons.items():
            inst = await self.store.instance(iid)
            if inst is None or inst.state is not InstanceState.PENDING:
                continue
            await self.store.set_reasons({iid: reason})
            back.append(Instance(id=iid, model=inst.model, state=InstanceState.PENDING, reason=reason))
            out = outs.get(iid)
            u = out.unschedulable if out is not None and not out.retry else None
            await self.bus.publish(
                subjects.EVENT_UNSCHEDULABLE,
                UnschedulableEvent(
                    instance_id=iid, model=inst.model, message=reason,
                    reasons=u.reasons if isinstance(u, Unschedulable) else (),
                    filters=u.filters if isinstance(u, Unschedulable) else (), at=now,
                ),
            )
        return back

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
        """Apply workers' instance reports: the planner decides on deletions, idle drains and failures; state
        changes go through the ledger script, which checks the reporting worker and only moves states
        forward, so reports that arrive late or out of order (several consumers) are ignored."""
        now = self.clock()
        reports = [
            Report(instance_id=st.instance_id, worker=st.worker, state=st.state, idle=st.idle, deleted=st.deleted,
                   message=st.message or "")
            for st in batch
        ]
        # The records the planner judges these reports against: the feed's, or the store's where the feed has none
        # for the reporting worker, read in one round trip for the whole batch (a report of a removed or unknown
        # instance is read too, and one worker can send 20,000 of them at once), taken in report order.
        judged: list[Instance | str] = []  # the feed's record, or the id to read
        for rep in reports:
            if rep.deleted or rep.idle or rep.state is InstanceState.ERROR:
                record = self.feed.instances.get(rep.instance_id)
                judged.append(record if record is not None and record.worker == rep.worker else rep.instance_id)
        read = [c for c in judged if isinstance(c, str)]
        stored = await self.store.instances_by_id(read) if read else {}
        known: dict[str, Instance] = {}
        for c in judged:
            record = stored.get(c) if isinstance(c, str) else c
            if record is not None:
                known[record.id] = record
        changes = [st for st in batch if not (st.deleted or st.idle)]
        if known:
            await self.apply(plan({}, list(known.values()), self.cluster(), reports, now, Book(), self.timings()),
                             known, now)
        prevs = await self.store.set_states([(st.instance_id, st.worker, st.state) for st in changes])
        moved: list[tuple[str, Instance]] = []  # (subject, record), in report order
        applied = [(st, prev) for st, prev in zip(changes, prevs, strict=True) if prev is not None]
        cached = {st.instance_id: fed for st, _ in applied
                  if (fed := self.feed.instances.get(st.instance_id)) is not None and fed.worker == st.worker}
        # The rest in one round trip, as above (one read per report took the status consumer seconds).
        stored = await self.store.instances_by_id([st.instance_id for st, _ in applied if st.instance_id not in cached])
        for st, prev in applied:
            record = cached.get(st.instance_id) or stored.get(st.instance_id)
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
        if not ids:
            return
        await self.store.release(ids)
        await self.store.forget_drains(ids)
        await self.store.forget_failures(ids)
        for inst in instances:
            self.seen_placed.pop(inst.id, None)
            self.requested.pop(inst.id, None)
            if tell_worker and inst.worker:
                await self.bus.publish(subjects.worker_delete(inst.worker), DeleteInstance(instance_id=inst.id))
        await self._publish_removed(instances)

    # ================================================================ applying a plan

    async def apply(self, p: Plan, records: Mapping[str, Instance], now: float) -> None:
        """Carry out a plan made over ``records`` (lost replicas, deletions, failures and their replacements,
        PENDING retries, forgotten workers). Scale-up creation goes through the atomic converge."""
        if p.unreachable:
            await self.store.release(list(p.unreachable), mode=InstanceState.UNREACHABLE.value)
            moved = [msgspec.structs.replace(records[i], state=InstanceState.UNREACHABLE) for i in p.unreachable]
            await self._publish_instances(moved)
            log.warning("replacing %d instances of lost workers", len(p.unreachable))
        await self._delete([records[i] for i in p.delete if i in records], tell_worker=True)
        await self._delete([records[i] for i in p.forget if i in records], tell_worker=False)
        if p.failures:
            await self.store.record_failures({i: (f.since, f.message) for i, f in p.failures.items()})
        if p.restarts:
            await self.store.set_restarts({m: (r.count, r.last_at) for m, r in p.restarts.items()})
        fresh = {i: why for i, why in p.reasons.items() if i in records and records[i].reason != why}
        if fresh:
            await self.store.set_reasons(fresh)
            await self._publish_instances([msgspec.structs.replace(records[i], reason=why) for i, why in fresh.items()])
        await self._book(p.retries)
        if p.request:
            await self.request(p.request, now)
        for worker in p.forget_workers:
            outcome = await self.store.forget_worker(worker, cutoff=now - self.settings.forget_after_s)
            if outcome == "ok":
                log.warning("forgot worker %s (silent for over %.0f s)", worker, self.settings.forget_after_s)
                await self._announce_removed(worker, f"silent for over {self.settings.forget_after_s:.0f} s")
        await self.converge_and_request(list(p.converge))

    # ================================================================ periodic checks

    async def _tick_loop(self) -> None:
        interval = self.settings.reconcile_interval_s
        # The loop also ends on the app's shutdown flag: a cancellation that arrives inside a client's own
        # timeout can come back as a TimeoutError (CPython 3.11), which the handler below would swallow.
        while not self.app_stopping:
            await asyncio.sleep(interval)
            # The tick number comes from the clock, not a local counter: the tick lock moves between
            # replicas, and every worker's resync shard and the full converge must still come round.
            n = int(self.clock() / interval)
            try:
                if await self.store.try_lock("tick", interval * 0.9):
                    await self.tick(full=n % FULL_EVERY == 0, resync_shard=n % RESYNC_SHARDS)
            except Exception:
                if _cancelling():  # a client library turned our cancellation into its own error: stop
                    raise
                log.exception("reconciler tick failed")

    async def tick(self, full: bool = False, resync_shard: int | None = None) -> None:
        """One planner step over every known instance (liveness, drain timeouts, failed replicas, PENDING
        retries, forgotten workers), then the level-triggered resync (of the workers in ``resync_shard`` of
        ``RESYNC_SHARDS``, or of all); ``full`` also re-converges every model and reports stored worker records
        that break today's limits (``StateWriter.report_invalid``)."""
        now = self.clock()
        if full:
            self.specs.update(await self.store.models())  # models another replica was told about
        records = dict(self.feed.instances)  # as of now: the awaits below let events change the feed's
        pending = {i for i, inst in records.items() if inst.state is InstanceState.PENDING}
        self.metrics.pending.labels(self.name).set(len(pending))
        retries = await self.store.retries()
        await self.store.forget_retries([i for i in retries if i not in pending])  # placed or removed since
        failures, restarts = await self.store.failures(), await self.store.restarts()
        book = Book(
            drains=await self.store.drains(),
            failures={i: Failure(since=t, message=m) for i, (t, m) in failures.items()},
            restarts={m: Restarts(count=c, last_at=t) for m, (c, t) in restarts.items()},
            retries={i: PendingRetry(*r) for i, r in retries.items() if i in pending},
        )
        desired = {m: Want(restart=spec.restart) for m, spec in self.specs.items()}
        p = plan(desired, list(records.values()), self.cluster(), (), now, book, self.timings())
        await self.apply(p, records, now)
        if stale := [i for i in failures if i not in records]:
            await self.store.forget_failures(stale)
        # the feed as it is now, not as the tick began: a replica committed and reported by its worker during the
        # awaits above is placed there, not a stray to delete
        await self._resync(dict(self.feed.instances), self.clock(), resync_shard)
        if full:
            await self._announce_stale(overdue_pending(list(records.values()), self.requested, now,
                                                       3 * self.settings.ack_wait_s))
            await self.converge_and_request(sorted((await self.store.desired()).keys()))
            await self.writer.report_invalid()  # stored records every snapshot left out, each reported once

    async def _announce_stale(self, ids: Sequence[str]) -> None:
        """Of replicas the feed shows PENDING, announce again those the store holds otherwise (placed, or gone), or
        PENDING with a reason the feed does not show: the event of that change was lost, and every feed (this one
        first) takes the stored record.

        A stored reason the feed missed (the replica that stored it killed before announcing it, or the event
        dropped) would otherwise strand the replica: the tick's PENDING retries read the feed, where it has no
        reason (in flight), and the converge's re-requests read the store, where it has one (not unrequested)."""
        if not ids:
            return
        states = await self.store.states(ids)
        stale = [i for i in ids if states.get(i) is not InstanceState.PENDING]
        waiting = [i for i in ids if states.get(i) is InstanceState.PENDING]
        feed = self.feed.instances
        unheard = [
            i for i, why in (await self.store.reasons(waiting)).items() if i in feed and feed[i].reason != why
        ]
        if unheard:
            log.warning("%d PENDING replicas have a stored reason this feed does not show (event lost): announcing "
                        "them", len(unheard))
            found = [inst for inst in (await self.store.instances_by_id(unheard)).values()
                     if inst.state is InstanceState.PENDING]
            await self._publish_instances(found)
        if not stale:
            return
        log.warning("%d replicas PENDING in this feed are not in the store (event lost): announcing them", len(stale))
        found = list((await self.store.instances_by_id(stale)).values())
        await self._publish_instances(found)
        known = {i.id for i in found}
        await self._publish_removed([feed[i] for i in stale if i not in known and i in feed])

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
            await self._assign(inst, await self.spec_of(inst.model))
        sent, tick = self._deletes_sent, time.monotonic()  # (a wall clock stepped back held deletes back as long)
        for key in [k for k, at in sent.items() if tick - at >= DELETE_RESEND_S]:
            del sent[key]
        for worker, iid in deletes_due(fix.delete, sent, tick, DELETE_RESEND_S, MAX_DELETES_PER_RESYNC):
            sent[(worker, iid)] = tick
            with contextlib.suppress(Exception):
                await self.bus.publish(subjects.worker_delete(worker), DeleteInstance(instance_id=iid))


def _cancelling() -> bool:
    """True when the running task has been asked to stop (shutdown), whatever a library raised instead."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _verdict(out: ItemOutcome, ledger: str) -> Commit:
    """The planner's input for one scored outcome: the ledger's verdict on its decision, or the pipeline's."""
    item = out.item
    if out.decision is not None:
        return Commit(item.instance_id, item.model, ledger, attempt=item.attempt)
    message = out.unschedulable.message if out.unschedulable else ""
    outcome = "stale" if out.retry else "unschedulable"
    return Commit(item.instance_id, item.model, outcome, attempt=item.attempt, reason=message)
