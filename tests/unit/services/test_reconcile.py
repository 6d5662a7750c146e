"""The reconciler's pure decisions, table-driven."""

from __future__ import annotations

import pytest

from shared.core.placement.domain import GIB, Candidate, Gpu, Instance, InstanceState, Worker
from shared.core.placement.reconcile import (
    GiveUp,
    Retry,
    after_refusal,
    drain_finished,
    plan_scale,
    resync_workers,
    still_fits,
)
from shared.core.placement.snapshot import ClusterSnapshot

S = InstanceState


def inst(iid: str, state: InstanceState = S.RUNNING, worker: str | None = "w1", **kw: object) -> Instance:
    return Instance(id=iid, model="m", state=state, worker=worker, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("desired", "states", "order", "create", "remove"),
    [
        (6, [], [], 6, ()),
        (6, [S.RUNNING, S.RUNNING], [], 4, ()),
        (2, [S.RUNNING] * 2, [], 0, ()),
        (1, [S.RUNNING, S.RUNNING, S.PENDING], ["i0", "i1"], 0, ("i2", "i0")),
        (0, [S.RUNNING, S.RUNNING], ["i1", "i0"], 0, ("i1", "i0")),
        (2, [S.RUNNING, S.DRAINING, S.UNREACHABLE], [], 1, ()),
    ],
    ids=["from-zero", "grow", "steady", "pending-first", "core-order", "draining-not-counted"],
)
def test_plan_scale_compares_desired_with_active_replicas(
    desired: int, states: list[InstanceState], order: list[str], create: int, remove: tuple[str, ...]
) -> None:
    instances = [inst(f"i{n}", s, None if s is S.PENDING else "w1") for n, s in enumerate(states)]
    plan = plan_scale(desired, instances, order)
    assert (plan.create, plan.remove) == (create, remove)


@pytest.mark.parametrize(
    ("idle", "elapsed", "done"), [(True, 0.0, True), (False, 1.0, False), (False, 5.0, True)]
)
def test_drain_ends_when_idle_or_timed_out(idle: bool, elapsed: float, done: bool) -> None:
    assert drain_finished(10.0, idle, 10.0 + elapsed, drain_timeout=5.0) is done


def test_refused_commit_retries_with_growing_backoff_then_gives_up() -> None:
    assert after_refusal(0, "full:w1:0", 3, 0.1) == Retry(attempt=1, delay=0.1)
    assert after_refusal(2, "full:w1:0", 3, 0.1) == Retry(attempt=3, delay=0.4)
    verdict = after_refusal(3, "full:w1:0", 3, 0.1)
    assert isinstance(verdict, GiveUp) and "full:w1:0" in verdict.reason


def test_resync_resends_lost_assignments_after_grace() -> None:
    instances = {"a": inst("a", S.SCHEDULED), "b": inst("b", S.SCHEDULED)}
    got = resync_workers(instances, {"w1": []}, {"a": 0.0, "b": 9.5}, now=10.0, grace=1.0)
    assert got.assign == ("a",)


def test_resync_deletes_instances_a_worker_should_not_run() -> None:
    instances = {"a": inst("a", S.UNREACHABLE), "b": inst("b", S.RUNNING, "w2")}
    got = resync_workers(instances, {"w1": ["a", "b", "c"]}, {}, now=10.0, grace=1.0)
    assert got.delete == (("w1", "a"), ("w1", "b"), ("w1", "c"))


def test_resync_ignores_workers_that_do_not_report() -> None:
    got = resync_workers({"a": inst("a", S.RUNNING)}, {}, {"a": 0.0}, now=10.0, grace=1.0)
    assert got.assign == () and got.delete == ()


def _snapshot_with_claims() -> ClusterSnapshot:
    gpus = tuple(Gpu(index=i, vram_total=80 * GIB) for i in range(2))
    snap = ClusterSnapshot.from_parts(workers=[Worker(name="w1", gpus=gpus, ram_total=64 * GIB, last_heartbeat=1.0)])
    snap.upsert_instance(inst("a", S.RUNNING, gpu_indexes=(0,), vram_claims=(70 * GIB,)))
    return snap


@pytest.mark.parametrize(
    ("gpu", "claim", "ram", "fits"),
    [(0, 10, 0, True), (0, 11, 0, False), (1, 80, 0, True), (1, 10, 65, False)],
    ids=["room-left", "too-big-for-remainder", "empty-gpu", "short-of-ram"],
)
def test_still_fits_checks_every_gpu_and_ram_against_the_snapshot(gpu: int, claim: int, ram: int, fits: bool) -> None:
    snap = _snapshot_with_claims()
    cand = Candidate(worker="w1", gpu_indexes=(gpu,), vram_claims=(claim * GIB,), ram_claim=ram * GIB)
    assert still_fits(snap, cand) is fits


@pytest.mark.parametrize(
    ("worker_cordoned", "gpu_schedulable", "fits"),
    [(False, True, True), (True, True, False), (False, False, False)],
    ids=["open", "worker-cordoned", "gpu-cordoned"],
)
def test_a_candidate_cordoned_since_fitting_no_longer_fits(
    worker_cordoned: bool, gpu_schedulable: bool, fits: bool
) -> None:
    gpus = (Gpu(index=0, vram_total=80 * GIB, schedulable=gpu_schedulable),)
    w = Worker(name="w1", gpus=gpus, ram_total=64 * GIB, last_heartbeat=1.0, cordoned=worker_cordoned)
    snap = ClusterSnapshot.from_parts(workers=[w])
    assert still_fits(snap, Candidate(worker="w1", gpu_indexes=(0,), vram_claims=(GIB,))) is fits


def test_deletes_already_sent_wait_their_resend_time_and_one_worker_gets_a_bounded_number() -> None:
    from shared.core.placement.reconcile import deletes_due

    ghosts = [("w2", f"ghost-{n:05d}") for n in range(10_000)] + [("w1", "stray")]
    first = deletes_due(ghosts, {}, 100.0, resend_s=30.0, per_worker=256)
    assert len(first) == 257 and ("w1", "stray") in first  # the flood is bounded; the other worker still served
    sent = dict.fromkeys(first, 100.0)
    again = deletes_due(ghosts, sent, 110.0, resend_s=30.0, per_worker=256)
    assert not set(again) & set(first) and len(again) == 256  # not re-sent within 30 s: the next ones go
    assert set(first) <= set(deletes_due(ghosts, sent, 130.0, resend_s=30.0, per_worker=20_000))
