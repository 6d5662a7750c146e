"""Issue 17: an ordinary restart replaces nothing as "instances of lost workers".

The reconciler's own state writer stores the workers' last-seen times, so while it is down they go stale in
Redis; the restarted process must not read that silence as worker loss before it could hear a heartbeat
(``gantry up`` starts the services before the workers, so at a restart of the stack the first ticks come
before any worker is heard)."""

from __future__ import annotations

import asyncio
import signal

import pytest

from shared.core.placement.domain import GIB, InstanceState, ModelSpec, PlacementStrategy

from .conftest import TIMINGS, Stack, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

MODEL = ModelSpec(name="svc", source="x/svc", weight_bytes=8 * GIB, placement_strategy=PlacementStrategy.SPREAD)
LIMIT = float(TIMINGS["not_ready_after_s"]) + float(TIMINGS["reschedule_after_s"])


async def running(stack: Stack, n: int) -> dict[str, str] | None:
    insts = [i for i in await stack.instances("svc") if i.state is InstanceState.RUNNING]
    return {i.id: i.worker or "" for i in insts} if len(insts) == n else None


async def test_a_restarted_reconciler_keeps_the_replicas_of_live_workers(stack: Stack) -> None:
    await restart(stack, with_workers=False)


async def test_a_restarted_stack_takes_no_worker_for_lost(stack: Stack) -> None:
    await restart(stack, with_workers=True)


async def restart(stack: Stack, with_workers: bool) -> None:
    # Heartbeats every 2 s (within the 3.5 s limit) while the reconciler ticks every 0.25 s: its first ticks
    # come before it has heard most workers.
    stack.start_workers("fleet", "--count", "4", "--gpus", "2", "--heartbeat-interval", "2")
    stack.start_services()
    await stack.wait_ready(workers=4)
    await stack.scale(MODEL, 4)
    before = await wait_until(lambda: running(stack, 4), 30, "4 RUNNING replicas")

    stack.kill("reconciler-0", signal.SIGTERM)
    if with_workers:
        stack.kill("fleet", signal.SIGKILL)  # no goodbye: as a host reboot
    await asyncio.sleep(LIMIT + 2)  # the stored seen times are now older than the lost-worker limit
    stack.start_service("reconciler")
    if with_workers:  # as ``gantry up`` does: services first, then the workers
        await asyncio.sleep(1.0)
        stack.start_workers("fleet", "--count", "4", "--gpus", "2", "--heartbeat-interval", "2")

    for _ in range(int((LIMIT + 2) / 0.25)):  # past the limit: the workers have been heard since
        insts = await stack.instances("svc")
        lost = [i.id for i in insts if i.state is InstanceState.UNREACHABLE]
        assert lost == [], f"live workers' replicas taken for lost after a restart: {lost}"
        await asyncio.sleep(0.25)
    if with_workers:  # restarted emulated workers run nothing: the replicas are placed again, not "lost"
        await wait_until(lambda: running(stack, 4), 30, "4 RUNNING replicas again")
    else:
        assert await running(stack, 4) == before
    assert "lost workers" not in (stack.logs / "reconciler-0.log").read_text(errors="replace")
    assert stack.crashed() == []
