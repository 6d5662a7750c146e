"""The reconcile planner: desired vs actual, in one pure function.

``plan(desired, instances, cluster, verdicts, now)`` returns what to do (a ``Plan``): replicas to create,
remove, drain, delete, declare lost or replace; placements to request (with their delay); reasons to record;
workers to forget. The reconciler service gathers the inputs from its snapshot and Redis, calls ``plan`` and
applies the result over NATS and Redis; it decides nothing itself. Like Nomad's reconciler, the planner reads
no clock and does no I/O, so every behaviour is a table row in ``tests/unit/placement/test_planner.py``.

Each concern is one small function below (liveness, drains, failures, scale, verdicts, reports, PENDING
retries, forgetting workers); ``plan`` runs them in that order on one accumulating builder, so a replica
already going away (lost, deleted) is never counted, drained or retried by a later step.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from shared.core.placement.domain import Instance, InstanceState, RestartMode, RestartPolicy, WorkerState
from shared.core.placement.lifecycle import ACTIVE, HOLDS_GPUS, ON_WORKER, backoff, silent_for, worker_state
from shared.core.placement.reconcile import GiveUp, after_refusal, drain_finished, plan_scale, workers_of

S = InstanceState
INF = float("inf")


# -- inputs ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timings:
    """The reconciler's settings, in seconds (``shared/settings.py`` documents each)."""

    not_ready_after: float = 15.0
    reschedule_after: float = 30.0
    drain_timeout: float = 30.0
    forget_after: float = 600.0
    commit_retries: int = 5
    commit_backoff: float = 0.02
    pending_retry: float = 1.0
    pending_retry_max: float = 8.0


@dataclass(frozen=True)
class Want:
    """What is desired of one model: its replicas (None: leave the count alone), how failed replicas are
    replaced, and its placed replicas ranked for removal (the core's scale-down chain, lowest keep first)."""

    replicas: int | None = None
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    removal_order: tuple[str, ...] = ()


@dataclass(frozen=True)
class Cluster:
    """What the planner needs of the cluster: every known worker's last heartbeat and cordon, and when the
    latest change that can make room happened (a worker joined, recovered or was uncordoned, claims were
    released, inventory grew), and since when the deciding process has been listening for heartbeats."""

    last_seen: Mapping[str, float] = field(default_factory=dict)
    cordoned: frozenset[str] = frozenset()
    changed_at: float = -INF
    # A worker's silence counts from this time at the earliest: before it, this process heard no heartbeats
    # and the stored last-seen times went stale (the state writer that records them restarts with it), so
    # after a restart a live worker is not taken for lost before it has had the time to be heard.
    listening_since: float = -INF

    def silent(self, worker: str, now: float) -> float:
        """Seconds ``worker`` has been silent as this process can tell (infinite when it was never heard)."""
        seen = self.last_seen.get(worker)
        return silent_for(None if seen is None else max(seen, self.listening_since), now)

    def heard_within(self, limit: float, now: float) -> set[str]:
        """The known workers with ``silent(w, now) <= limit``: the same arithmetic in one pass (the planner asks
        it of every worker each tick)."""
        since = self.listening_since
        # ``since if since > seen else seen`` is ``max(seen, since)`` (NaN included) without a call per worker.
        return {w for w, seen in self.last_seen.items() if now - (since if since > seen else seen) <= limit}

    def silent_over(self, limit: float, now: float) -> set[str]:
        """The known workers with ``silent(w, now) > limit``, in one pass."""
        since = self.listening_since
        if now - since <= limit:  # silence counts from ``since`` at the earliest: none is longer than this
            return set()
        return {w for w, seen in self.last_seen.items() if now - (since if since > seen else seen) > limit}

    def state(self, worker: str, now: float, not_ready_after: float) -> WorkerState:
        """The worker's liveness as every process judges it (an unknown worker is NOT_READY)."""
        seen = self.last_seen.get(worker)
        if seen is None:
            return WorkerState.NOT_READY
        return worker_state(worker in self.cordoned, seen, now, not_ready_after)


@dataclass(frozen=True)
class Commit:
    """The ledger's verdict on one decision: "ok", "dup", "gone", "full:<gpu>", "invalid:<why>" (a record outside
    the limits, refused like a full GPU); or the pipeline's: "stale"
    (its candidates were taken in flight) or "unschedulable" (``reason`` says why)."""

    instance_id: str
    model: str
    outcome: str
    attempt: int = 0
    reason: str = ""


@dataclass(frozen=True)
class Report:
    """A worker's report on one instance (``InstanceStatus``)."""

    instance_id: str
    worker: str
    state: InstanceState
    idle: bool = False
    deleted: bool = False
    message: str = ""


Verdict = Commit | Report


@dataclass(frozen=True)
class PendingRetry:
    """When a PENDING replica was last requested, how often it was retried, and when it is next due."""

    attempts: int
    next_at: float
    requested_at: float


@dataclass(frozen=True)
class Failure:
    """An ERROR replica: since when, and what its worker said."""

    since: float
    message: str = ""


@dataclass(frozen=True)
class Restarts:
    """How many failed replicas of a model were replaced lately, the last one when."""

    count: int
    last_at: float


@dataclass(frozen=True)
class Book:
    """What the reconciler remembers between plans (drains and failures live in Redis, the rest in memory)."""

    drains: Mapping[str, float] = field(default_factory=dict)  # DRAINING since
    failures: Mapping[str, Failure] = field(default_factory=dict)
    restarts: Mapping[str, Restarts] = field(default_factory=dict)  # per model
    retries: Mapping[str, PendingRetry] = field(default_factory=dict)


# -- output ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ask:
    """Request a placement of one PENDING replica, ``delay`` seconds from now."""

    instance_id: str
    model: str
    attempt: int = 0
    delay: float = 0.0


@dataclass(frozen=True)
class Plan:
    """Everything one reconcile step does. Ids are sorted; mappings are keyed by instance id unless said."""

    create: Mapping[str, int] = field(default_factory=dict)  # model -> new PENDING replicas (caller holds lock)
    converge: tuple[str, ...] = ()  # models to bring back to their desired replicas (replacements)
    remove: tuple[str, ...] = ()  # PENDING replicas removed outright: they hold nothing
    drain: tuple[str, ...] = ()
    delete: tuple[str, ...] = ()  # release, tell the worker to stop it, forget
    forget: tuple[str, ...] = ()  # release and forget: the worker has it no more
    unreachable: tuple[str, ...] = ()  # lost with their worker: release, keep the record
    committed: tuple[str, ...] = ()
    assign: tuple[str, ...] = ()  # re-send the assignment (a redelivered commit)
    request: tuple[Ask, ...] = ()
    pending: Mapping[str, str] = field(default_factory=dict)  # PENDING, and why
    reasons: Mapping[str, str] = field(default_factory=dict)  # ERROR replicas: when they are replaced
    failures: Mapping[str, Failure] = field(default_factory=dict)  # newly seen failures to remember
    restarts: Mapping[str, Restarts] = field(default_factory=dict)  # per model, updated
    retries: Mapping[str, PendingRetry] = field(default_factory=dict)  # updated retry book entries
    dropped: tuple[str, ...] = ()  # forget their retry book entries
    forget_workers: tuple[str, ...] = ()

    def request_delay(self) -> float:
        """How long to wait before sending this plan's requests: refused commits of one batch wait together,
        for the shortest of their backoffs (the others have waited about as long by the next refusal)."""
        return min((a.delay for a in self.request), default=0.0)



@dataclass
class _Builder:
    create: dict[str, int] = field(default_factory=dict)
    converge: set[str] = field(default_factory=set)
    remove: set[str] = field(default_factory=set)
    drain: set[str] = field(default_factory=set)
    delete: set[str] = field(default_factory=set)
    forget: set[str] = field(default_factory=set)
    unreachable: set[str] = field(default_factory=set)
    committed: set[str] = field(default_factory=set)
    assign: set[str] = field(default_factory=set)
    request: dict[str, Ask] = field(default_factory=dict)
    pending: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    failures: dict[str, Failure] = field(default_factory=dict)
    restarts: dict[str, Restarts] = field(default_factory=dict)
    retries: dict[str, PendingRetry] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)
    forget_workers: set[str] = field(default_factory=set)

    def gone(self, iid: str) -> bool:
        return iid in self.remove or iid in self.delete or iid in self.forget or iid in self.unreachable

    def build(self) -> Plan:
        return Plan(
            create={m: n for m, n in sorted(self.create.items()) if n > 0},
            converge=tuple(sorted(self.converge)),
            remove=tuple(sorted(self.remove)),
            drain=tuple(sorted(self.drain)),
            delete=tuple(sorted(self.delete)),
            forget=tuple(sorted(self.forget)),
            unreachable=tuple(sorted(self.unreachable)),
            committed=tuple(sorted(self.committed)),
            assign=tuple(sorted(self.assign)),
            request=tuple(self.request[i] for i in sorted(self.request)),
            pending=dict(sorted(self.pending.items())),
            reasons=dict(sorted(self.reasons.items())),
            failures=dict(sorted(self.failures.items())),
            restarts=dict(sorted(self.restarts.items())),
            retries=dict(sorted(self.retries.items())),
            dropped=tuple(sorted(self.dropped)),
            forget_workers=tuple(sorted(self.forget_workers)),
        )


# -- the planner ------------------------------------------------------------------------------------------


def plan(
    desired: Mapping[str, Want],
    instances: Sequence[Instance],
    cluster: Cluster,
    verdicts: Sequence[Verdict],
    now: float,
    book: Book = Book(),
    timings: Timings = Timings(),
) -> Plan:
    """One reconcile step over ``instances`` (the current records), given what is ``desired`` per model, the
    ``cluster``'s liveness, the ``verdicts`` that arrived (commits, worker reports) and what the reconciler
    remembers (``book``). Pure: the same inputs give the same plan."""
    b = _Builder()
    by_state: dict[InstanceState, list[Instance]] = {}
    for inst in instances:  # one pass; each step below reads only the states it is about
        by_state.setdefault(inst.state, []).append(inst)
    reports = [v for v in verdicts if isinstance(v, Report)]
    if reports:
        _reports(b, reports, {i.id: i for i in instances}, now)
    _liveness(b, by_state, cluster, now, timings)
    _drains(b, by_state.get(S.DRAINING, []), book, now, timings)
    _failures(b, by_state.get(S.ERROR, []), desired, book, now)
    _scale(b, desired, instances)
    _commits(b, [v for v in verdicts if isinstance(v, Commit)], book, cluster, now, timings)
    _pending_retries(b, by_state.get(S.PENDING, []), cluster, book, now, timings)
    _forget_workers(b, instances, cluster, now, timings)
    return b.build()


def _reports(b: _Builder, reports: Sequence[Report], by_id: Mapping[str, Instance], now: float) -> None:
    """Deletion confirmations, idle drains and failures reported by workers (a report from a worker that no
    longer holds the instance is ignored: it arrived late or out of order)."""
    for rep in reports:
        known = by_id.get(rep.instance_id)
        if known is None or known.worker != rep.worker:
            continue
        if rep.deleted and known.state in (S.DRAINING, S.UNREACHABLE):
            b.forget.add(known.id)
        elif rep.deleted and known.state is S.ERROR:  # the worker gave up on it: replace at once
            b.forget.add(known.id)
            b.converge.add(known.model)
        elif rep.idle and known.state is S.DRAINING:
            b.delete.add(known.id)
        elif rep.state is S.ERROR and known.state in HOLDS_GPUS and known.state is not S.DRAINING:
            b.failures[known.id] = Failure(since=now, message=rep.message)


def _liveness(
    b: _Builder, by_state: Mapping[InstanceState, Sequence[Instance]], cluster: Cluster, now: float, t: Timings
) -> None:
    """Replicas on a worker silent past ``not_ready_after + reschedule_after`` (or never heard) are lost and
    replaced; lost replicas whose worker is back are deleted from it (their claims were released already)."""
    limit = t.not_ready_after + t.reschedule_after
    placed = [inst for state in ON_WORKER | {S.ERROR} for inst in by_state.get(state, ())]
    # Alive: heard within the limit. Checked per placed replica, so kept to one set lookup per worker; a step
    # without placed replicas (a commit batch's) needs no pass over every worker.
    alive = cluster.heard_within(limit, now) if placed else set()
    for inst in placed:  # the order does not matter: the builder sorts
        on_lost = (inst.worker is not None and inst.worker not in alive) or (
            bool(inst.subordinates) and any(sub.worker not in alive for sub in inst.subordinates)
        )
        if on_lost and not b.gone(inst.id):
            b.unreachable.add(inst.id)
            b.converge.add(inst.model)
    for inst in by_state.get(S.UNREACHABLE, ()):
        back = inst.worker is not None and cluster.state(inst.worker, now, t.not_ready_after) is WorkerState.READY
        if back and not b.gone(inst.id):
            b.delete.add(inst.id)


def _drains(b: _Builder, draining: Sequence[Instance], book: Book, now: float, t: Timings) -> None:
    """A DRAINING replica is deleted once its drain times out (an idle report deletes it sooner)."""
    for inst in draining:
        started = book.drains.get(inst.id)
        if started is None or b.gone(inst.id):
            continue
        if drain_finished(started, False, now, t.drain_timeout):
            b.delete.add(inst.id)


def _failures(
    b: _Builder, failed: Sequence[Instance], desired: Mapping[str, Want], book: Book, now: float
) -> None:
    """ERROR replicas are not serving: each is replaced once its model's restart delay has passed since it
    failed (grace, then exponential backoff per model); until then its reason says when."""
    due: dict[str, list[Instance]] = {}
    for inst in failed:
        if b.gone(inst.id):
            continue
        failure = b.failures.get(inst.id) or book.failures.get(inst.id)
        if failure is None:
            failure = b.failures[inst.id] = Failure(since=now)
        policy = desired[inst.model].restart if inst.model in desired else RestartPolicy()
        what = f"ERROR{': ' + failure.message if failure.message else ''}"
        if policy.mode is RestartMode.NEVER:
            b.reasons[inst.id] = f"{what}; not replaced (restart policy: never)"
            continue
        count = _restart_count(book.restarts.get(inst.model), policy, now)
        at = failure.since + restart_delay(policy, count)
        if now >= at:
            due.setdefault(inst.model, []).append(inst)
        else:
            b.reasons[inst.id] = (
                f"{what}; replacing at {_clock(at)} (replacement {count + 1} of this model, "
                f"{restart_delay(policy, count):.0f} s after failing)"
            )
    for model, failed in sorted(due.items()):
        prev = book.restarts.get(model)
        policy = desired[model].restart if model in desired else RestartPolicy()
        b.restarts[model] = Restarts(count=_restart_count(prev, policy, now) + 1, last_at=now)
        b.delete.update(i.id for i in failed)
        b.converge.add(model)


def restart_delay(policy: RestartPolicy, count: int) -> float:
    """Seconds from failing to replacement for the model's ``count``-th recent replacement (0-based)."""
    if count <= 0:
        return policy.grace_s
    return policy.grace_s + backoff(policy.backoff_s, count - 1, policy.max_backoff_s)


def _restart_count(prev: Restarts | None, policy: RestartPolicy, now: float) -> int:
    if prev is None or now - prev.last_at >= policy.reset_after_s:
        return 0
    return prev.count


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(at))


def _scale(b: _Builder, desired: Mapping[str, Want], instances: Sequence[Instance]) -> None:
    """Desired vs active replicas per model (those this step takes away do not count): create the missing,
    remove PENDING ones first, then drain the placed ones the removal order ranks lowest."""
    counted = {m for m, w in desired.items() if w.replicas is not None}
    if not counted:
        return
    by_model: dict[str, list[Instance]] = {}
    for inst in instances:
        if inst.model in counted and not b.gone(inst.id):
            by_model.setdefault(inst.model, []).append(inst)
    for model, want in sorted(desired.items()):
        if want.replicas is None:
            continue
        mine = by_model.get(model, [])
        placed = [i.id for i in mine if i.state in ACTIVE and i.state is not S.PENDING]
        order = [i for i in want.removal_order if i in set(placed)]
        step = plan_scale(want.replicas, mine, order)
        if step.create:
            b.create[model] = b.create.get(model, 0) + step.create
        states = {i.id: i.state for i in mine}
        for iid in step.remove:
            (b.remove if states[iid] is S.PENDING else b.drain).add(iid)


def _commits(
    b: _Builder, commits: Sequence[Commit], book: Book, cluster: Cluster, now: float, t: Timings
) -> None:
    """Every verdict has a branch: ok commits; dup re-sends the assignment; gone forgets (the replica was
    removed in flight); refused and stale re-place with backoff until the bound, then wait PENDING;
    unschedulable waits PENDING with its reason, retried later (see ``_pending_retries``).

    A replica requested twice (its first request outlived a reconciler restart) can have several outcomes in
    one batch: the one that placed it wins (ok, else dup), and its other verdicts are void, or the replica
    would be both committed and placed again."""
    for c in _placing_first(commits):
        if c.outcome == "ok":
            b.committed.add(c.instance_id)
            b.dropped.add(c.instance_id)
        elif c.outcome == "dup":
            b.assign.add(c.instance_id)
            b.dropped.add(c.instance_id)
        elif c.outcome == "gone":
            b.dropped.add(c.instance_id)
        elif c.outcome.startswith(("full:", "invalid:")) or c.outcome == "stale":
            why = c.outcome if c.outcome != "stale" else (c.reason or "candidates taken in flight")
            step = after_refusal(c.attempt, why, t.commit_retries, t.commit_backoff)
            if isinstance(step, GiveUp):
                _wait_pending(b, c, step.reason, book, cluster, now, t)
            else:
                b.request[c.instance_id] = Ask(c.instance_id, c.model, attempt=step.attempt, delay=step.delay)
        elif c.outcome == "unschedulable":
            _wait_pending(b, c, c.reason or "unschedulable", book, cluster, now, t)
        else:
            raise ValueError(f"unknown commit verdict {c.outcome!r} for {c.instance_id}")


PLACING = ("ok", "dup")  # verdicts that leave the replica placed, strongest first


def _placing_first(commits: Sequence[Commit]) -> list[Commit]:
    """A placed replica's strongest placing verdict alone; every verdict of the others, in order."""
    placed: dict[str, Commit] = {}
    for c in commits:
        if not _known(c.outcome):  # even beside a placing verdict: never a silent drop
            raise ValueError(f"unknown commit verdict {c.outcome!r} for {c.instance_id}")
        if c.outcome in PLACING:
            known = placed.get(c.instance_id)
            if known is None or PLACING.index(c.outcome) < PLACING.index(known.outcome):
                placed[c.instance_id] = c
    return [c for c in commits if placed.get(c.instance_id, c) is c]


def _known(outcome: str) -> bool:
    return outcome in (*PLACING, "gone", "stale", "unschedulable") or outcome.startswith(("full:", "invalid:"))


def _wait_pending(b: _Builder, c: Commit, reason: str, book: Book, cluster: Cluster, now: float, t: Timings) -> None:
    """PENDING with ``reason``; retried after a backoff that grows with each verdict, or at the next step
    when the cluster changed since the replica was requested (the verdict may predate the change)."""
    prev = book.retries.get(c.instance_id)
    attempts = prev.attempts if prev else 0
    asked = prev.requested_at if prev else -INF
    delay = backoff(t.pending_retry, attempts, t.pending_retry_max)
    next_at = now if cluster.changed_at > asked else now + delay
    b.pending[c.instance_id] = reason
    b.retries[c.instance_id] = PendingRetry(attempts=attempts, next_at=next_at, requested_at=asked)


def _pending_retries(
    b: _Builder, pending: Sequence[Instance], cluster: Cluster, book: Book, now: float, t: Timings
) -> None:
    """A PENDING replica with a reason is requested again when the cluster changed since it was last
    requested, or when its backoff has passed (the periodic flush: a change may have gone unseen)."""
    for inst in pending:
        if not inst.reason or b.gone(inst.id) or inst.id in b.request:
            continue
        if inst.id in b.pending:  # a verdict in this very step: its retry is booked already
            continue
        prev = book.retries.get(inst.id)
        if prev is not None and cluster.changed_at <= prev.requested_at and now < prev.next_at:
            continue
        attempts = prev.attempts + 1 if prev else 0
        b.request[inst.id] = Ask(inst.id, inst.model)
        next_at = now + backoff(t.pending_retry, attempts, t.pending_retry_max)
        b.retries[inst.id] = PendingRetry(attempts=attempts, next_at=next_at, requested_at=now)


def _forget_workers(b: _Builder, instances: Sequence[Instance], cluster: Cluster, now: float, t: Timings) -> None:
    """A worker silent past ``forget_after`` leaves the state once nothing placed on it holds claims: its lost
    (UNREACHABLE) records go with it."""
    old = cluster.silent_over(t.forget_after, now)
    if not old:
        return
    holding: set[str] = set()
    lost: dict[str, list[str]] = {}
    for inst in instances:
        if b.gone(inst.id) and inst.id not in b.unreachable:
            continue
        for w in workers_of(inst):
            if w not in old:
                continue
            if inst.state is S.UNREACHABLE or inst.id in b.unreachable:
                lost.setdefault(w, []).append(inst.id)
            else:
                holding.add(w)
    for w in sorted(old - holding):
        b.forget_workers.add(w)
        for iid in lost.get(w, ()):
            b.unreachable.discard(iid)
            b.forget.add(iid)


# -- operator commands ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerRemoval:
    """Remove a worker: forget it and every record placed on it (claims released), re-converge ``models``."""

    worker: str
    forget: tuple[str, ...]
    models: tuple[str, ...]


def remove_worker(
    worker: str, instances: Sequence[Instance], cluster: Cluster, now: float, timings: Timings = Timings(),
    invalid_record: bool = False,
) -> WorkerRemoval | str:
    """``gantry workers remove``: a plan, or why not (one line). A live worker is refused: it would register
    again at once, and its replicas are running; stop it (or let it go NOT_READY) first. A worker known only by a
    stored record that breaks today's limits (``invalid_record``: no snapshot holds it) may be removed: that is how
    an operator clears the record (the state layer's removal still refuses it while claims remain on it, or if the
    worker was heard since it went silent)."""
    if worker not in cluster.last_seen:
        if not invalid_record:
            return f"unknown worker {worker!r}"
        return _removal(worker, instances)
    age = silent_for(cluster.last_seen[worker], now)
    if age < timings.not_ready_after:
        on = sum(1 for i in instances if worker in workers_of(i) and i.state in HOLDS_GPUS)
        held = f", holds {on} replica(s)" if on else ""
        return f"worker {worker} is alive (heard {age:.1f} s ago{held}); stop it first or it registers again"
    return _removal(worker, instances)


def _removal(worker: str, instances: Sequence[Instance]) -> WorkerRemoval:
    mine = sorted(i.id for i in instances if worker in workers_of(i))
    models = sorted({i.model for i in instances if worker in workers_of(i)})
    return WorkerRemoval(worker=worker, forget=tuple(mine), models=tuple(models))


def needs_request(last_requested: float | None, now: float, timeout: float) -> bool:
    """A PENDING replica without a reason is in flight, unless this process has not requested it within
    ``timeout`` (its request, or the process that sent it, may have been lost)."""
    return last_requested is None or now - last_requested > timeout


def overdue_pending(
    instances: Sequence[Instance], requested: Mapping[str, float], now: float, timeout: float
) -> tuple[str, ...]:
    """PENDING replicas (in flight or waiting) that this process has not requested within ``timeout``: the ones
    whose record to check against the stored state. A placement whose event was lost (NATS died with it in
    flight) leaves a feed showing the replica PENDING for good: nothing re-requests it (the store says it is
    placed), and nothing re-sends its assignment (the resync compares workers with the feed)."""
    return tuple(sorted(
        i.id for i in instances
        if i.state is S.PENDING and needs_request(requested.get(i.id), now, timeout)
    ))
