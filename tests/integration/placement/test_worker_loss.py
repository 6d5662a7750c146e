"""Done-when 4: a silent worker's instances are replaced within reschedule_after + 5 s; it comes back."""

from __future__ import annotations

import signal
import time

import pytest

from shared.core.placement.domain import GIB, InstanceState, ModelSpec, PlacementStrategy

from .conftest import TIMINGS, Stack, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# These tests rely on replicas spreading over empty workers, so the model names spread (the default packs).
MODEL = ModelSpec(name="svc", source="x/svc", weight_bytes=8 * GIB, placement_strategy=PlacementStrategy.SPREAD)
RESCHEDULE_AFTER = float(TIMINGS["reschedule_after_s"])


async def running(stack: Stack, n: int, avoid: str | None = None) -> list[str] | None:
    insts = [i for i in await stack.instances("svc") if i.state is InstanceState.RUNNING]
    workers = [i.worker or "" for i in insts]
    if len(insts) == n and (avoid is None or avoid not in workers):
        return workers
    return None


async def test_lost_worker_instances_move_and_the_worker_returns(stack: Stack) -> None:
    stack.start_workers("fleet", "--count", "3", "--gpus", "2", "--heartbeat-interval", "0.2")
    stack.start_workers("lonely", "--count", "1", "--gpus", "2", "--prefix", "x", "--heartbeat-interval", "0.2")
    stack.start_services()
    await stack.wait_ready(workers=4)

    await stack.scale(MODEL, 4)
    workers = await wait_until(lambda: running(stack, 4), 30, "4 RUNNING replicas")
    assert "x0" in workers, f"spread over 4 empty workers must use x0: {workers}"

    # The worker goes silent (process frozen: no heartbeats, no answers).
    stack.kill("lonely", signal.SIGSTOP)
    t0 = time.monotonic()
    await wait_until(lambda: running(stack, 4, avoid="x0"), RESCHEDULE_AFTER + 5, "replacement off x0")
    took = time.monotonic() - t0
    assert took <= RESCHEDULE_AFTER + 5
    lost = [i for i in await stack.instances("svc") if i.worker == "x0"]
    assert all(i.state is InstanceState.UNREACHABLE for i in lost)
    assert all(used == 0 for f, (used, _) in (await stack.store.ledger()).items() if f.startswith("x0:"))

    # It recovers: the stale copy is removed and x0 is a candidate again (spread prefers the empty worker).
    stack.kill("lonely", signal.SIGCONT)

    async def stale_gone() -> bool:
        return not [i for i in await stack.instances("svc") if i.worker == "x0"]

    await wait_until(stale_gone, 30, "stale x0 instance removed")
    await wait_until(lambda: stack.store.worker_names(), 15, "workers")
    await stack.scale(MODEL, 5, with_spec=False)
    workers = await wait_until(lambda: running(stack, 5), 20, "5 RUNNING replicas")
    assert "x0" in workers, f"the recovered worker should take the new replica: {workers}"
    assert stack.crashed() == []


async def test_pending_replica_is_placed_when_a_worker_joins(stack: Stack) -> None:
    stack.start_workers("first", "--count", "1", "--gpus", "1", "--heartbeat-interval", "0.2")
    stack.start_services()
    await stack.wait_ready(workers=1)
    await stack.scale(MODEL, 2)  # 90% of a GPU each: only one fits

    async def one_pending_with_reason() -> str | None:
        insts = await stack.instances("svc")
        pend = [i for i in insts if i.state is InstanceState.PENDING and i.reason]
        run = [i for i in insts if i.state is InstanceState.RUNNING]
        return pend[0].reason if len(pend) == 1 and len(run) == 1 else None

    reason = await wait_until(one_pending_with_reason, 20, "one RUNNING and one PENDING with a reason")
    assert "GiB" in reason
    stack.start_workers("late", "--count", "1", "--gpus", "1", "--prefix", "late", "--heartbeat-interval", "0.2")
    workers = await wait_until(lambda: running(stack, 2), 20, "the PENDING replica placed on the new worker")
    assert sorted(workers) == ["late0", "w0"]
