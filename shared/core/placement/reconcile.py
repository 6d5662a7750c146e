"""Pure pieces of the reconciler's decisions: replica counts, drains, commit retries, resync (the planner,
``planner.py``, composes them; worker liveness lives in ``lifecycle`` and the planner).

Everything here is deterministic and clock-free (``now`` is passed in); the reconciler service only
gathers inputs, calls these functions, and carries out the result over NATS and Redis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shared.core.placement.domain import Candidate, Instance, InstanceState
from shared.core.placement.lifecycle import ACTIVE, KEPT_ON_WORKER, ON_WORKER
from shared.core.placement.lifecycle import backoff as backoff_of
from shared.core.placement.snapshot import ClusterSnapshot


@dataclass(frozen=True)
class ScalePlan:
    """What converging one model needs: how many replicas to create, which to remove."""

    create: int
    remove: tuple[str, ...]


def plan_scale(desired: int, instances: Sequence[Instance], removal_order: Sequence[str]) -> ScalePlan:
    """Compare desired replicas with the active ones.

    ``removal_order`` ranks placed instances lowest-keep-score first (the core's scale-down chain);
    PENDING replicas go before any placed one since they hold nothing and serve nothing.
    """
    active = [i for i in instances if i.state in ACTIVE]
    if len(active) < desired:
        return ScalePlan(create=desired - len(active), remove=())
    excess = len(active) - desired
    if excess == 0:
        return ScalePlan(create=0, remove=())
    pending = sorted(i.id for i in active if i.state is InstanceState.PENDING)
    active_ids = {i.id for i in active}
    ranked = [i for i in removal_order if i in active_ids and i not in set(pending)]
    rest = sorted(active_ids - set(pending) - set(ranked))
    return ScalePlan(create=0, remove=tuple((pending + ranked + rest)[:excess]))


def workers_of(inst: Instance) -> list[str]:
    """Every worker an instance occupies: its main worker, then its subordinates."""
    return ([inst.worker] if inst.worker else []) + [s.worker for s in inst.subordinates]


def drain_finished(started_at: float, idle: bool, now: float, drain_timeout: float) -> bool:
    """A DRAINING instance is deleted once its worker reports it idle, or after the drain timeout."""
    return idle or now - started_at >= drain_timeout


@dataclass(frozen=True)
class Retry:
    """Place the replica again after ``delay`` seconds (fresh state)."""

    attempt: int
    delay: float


@dataclass(frozen=True)
class GiveUp:
    """Stop retrying: the replica stays PENDING with ``reason`` until the cluster changes."""

    reason: str


def after_refusal(attempt: int, verdict: str, max_retries: int, backoff: float) -> Retry | GiveUp:
    """What to do after the ledger refused a commit (``verdict`` is "full:<gpu>").

    Exponential backoff with a deterministic per-attempt growth; bounded by ``max_retries``.
    """
    if attempt >= max_retries:
        return GiveUp(f"commit refused {attempt + 1} times (last: {verdict}); waiting for the cluster to change")
    return Retry(attempt=attempt + 1, delay=backoff_of(backoff, attempt))


@dataclass(frozen=True)
class Resync:
    """Level-triggered repairs from worker heartbeats: assignments to re-send, strays to delete."""

    assign: tuple[str, ...]
    delete: tuple[tuple[str, str], ...]  # (worker, instance id)


def deletes_due(
    deletes: Sequence[tuple[str, str]], sent: Mapping[tuple[str, str], float], now: float, resend_s: float,
    per_worker: int,
) -> list[tuple[str, str]]:
    """The (worker, instance) deletes of a resync to send now: not sent within ``resend_s`` (a worker's next
    heartbeat still names an instance it is deleting), and at most ``per_worker`` for one worker. A heartbeat may
    name thousands of ids the state does not place there; sent all, at every resync, they were a flood of
    commands on the reconciler's loop and on NATS that one agent could keep up with one message a second."""
    out: list[tuple[str, str]] = []
    count: dict[str, int] = {}
    for key in deletes:
        worker = key[0]
        if now - sent.get(key, -math.inf) < resend_s or count.get(worker, 0) >= per_worker:
            continue
        count[worker] = count.get(worker, 0) + 1
        out.append(key)
    return out


def resync_workers(
    instances: Mapping[str, Instance],
    reported: Mapping[str, Sequence[str]],
    committed_at: Mapping[str, float],
    now: float,
    grace: float,
) -> Resync:
    """Compare what workers say they run with what the state says they should.

    ``reported`` holds each live worker's latest heartbeat instance list. An instance the state places
    on a reporting worker but missing from its report for longer than ``grace`` after commit gets its
    assignment re-sent (the original may have been lost with a crashed reconciler). An instance a worker
    runs that the state does not place there (removed, or moved after UNREACHABLE) is deleted.
    """
    assign = []
    delete = []
    held: dict[str, set[str]] = {w: set(ids) for w, ids in reported.items()}
    for inst in instances.values():
        if inst.state not in ON_WORKER or inst.worker not in held:
            continue
        if inst.id not in held[inst.worker] and now - committed_at.get(inst.id, now) > grace:
            assign.append(inst.id)
    for worker, ids in held.items():
        for iid in ids:
            found = instances.get(iid)
            on_it = found is not None and found.worker == worker and found.state in KEPT_ON_WORKER
            if not on_it:
                delete.append((worker, iid))
    return Resync(assign=tuple(sorted(assign)), delete=tuple(sorted(delete)))


def still_fits(snapshot: ClusterSnapshot, candidate: Candidate) -> bool:
    """Whether every worker of a candidate is still known and not cordoned, and every GPU schedulable with
    room (and worker RAM) in ``snapshot``.

    Scoring replicas assume their own decisions into their snapshot before the commit comes back; a
    candidate fitting computed earlier may have lost its room to such an assumption, or its worker or GPU
    may have been cordoned since.
    """
    parts = [(candidate.worker, candidate.gpu_indexes, candidate.vram_claims, candidate.ram_claim,
              candidate.cpu_claim)]
    parts += [(s.worker, s.gpu_indexes, s.vram_claims, s.ram_claim, s.cpu_claim) for s in candidate.subordinates]
    for worker, indexes, claims, ram, cpu in parts:
        record = snapshot.worker(worker)
        if record is None or record.cordoned:
            return False
        schedulable = {g.index for g in record.gpus if g.schedulable}
        for index, claim in zip(indexes, claims, strict=True):
            if index not in schedulable or snapshot.gpu_allocatable(worker, index) < claim:
                return False
        if ram and snapshot.ram_allocatable(worker) < ram:
            return False
        if cpu and snapshot.cpu_allocatable(worker) < cpu:
            return False
    return True


__all__ = [
    "ACTIVE", "ON_WORKER", "GiveUp", "Resync", "Retry", "ScalePlan", "after_refusal", "drain_finished", "plan_scale",
    "resync_workers", "still_fits", "workers_of",
]
