"""Issue 12 case 6: an ERROR replica is not serving; it is replaced after its restart policy's grace period
(with backoff), and `gantry explain` says when."""

from __future__ import annotations

import asyncio
import time

import pytest

from shared.bus import subjects
from shared.bus.messages import InstanceStatus, encode
from shared.core.placement.domain import GIB, InstanceState, ModelSpec, RestartPolicy
from tests.integration.cli.conftest import run_cli

from .conftest import Stack, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

GRACE = 3.0
MODEL = ModelSpec(
    name="svc", source="x/svc", weight_bytes=8 * GIB,
    restart=RestartPolicy(grace_s=GRACE, backoff_s=2.0, max_backoff_s=10.0, reset_after_s=60.0),
)


async def running(stack: Stack, n: int) -> list[str] | None:
    insts = await stack.instances("svc")
    ids = sorted(i.id for i in insts if i.state is InstanceState.RUNNING)
    return ids if len(ids) == n and len(insts) == n else None


async def fail(stack: Stack, iid: str, worker: str, message: str) -> None:
    """What a worker sends when its model server dies: an ERROR report on the status stream."""
    report = InstanceStatus(instance_id=iid, worker=worker, state=InstanceState.ERROR, message=message)
    await stack.nc.jetstream().publish(subjects.instance_status(worker), encode(report),
                                       headers={"Nats-Msg-Id": f"{iid}:{worker}:ERROR:{time.time()}"})


async def test_an_error_replica_is_replaced_after_the_grace_period_and_explain_says_when(stack: Stack) -> None:
    stack.start_workers("fleet", "--count", "3", "--gpus", "2", "--heartbeat-interval", "0.2")
    stack.start_services()
    await stack.wait_ready(workers=3)
    await stack.scale(MODEL, 2)
    before = await wait_until(lambda: running(stack, 2), 30, "2 RUNNING replicas")
    victim = next(i for i in await stack.instances("svc") if i.id == before[0])
    assert victim.worker is not None

    await fail(stack, victim.id, victim.worker, "CUDA error: out of memory")
    t0 = time.monotonic()

    async def error_with_reason() -> str | None:
        inst = next((i for i in await stack.instances("svc") if i.id == victim.id), None)
        ok = inst is not None and inst.state is InstanceState.ERROR and inst.reason
        return inst.reason if ok and inst is not None else None

    reason = await wait_until(error_with_reason, GRACE, "the ERROR replica's reason")
    assert "out of memory" in reason and "replacing at" in reason
    env = {**stack.env, "COLUMNS": "200"}
    shown = await asyncio.to_thread(run_cli, ["explain", "svc"], env)
    assert shown.code == 0, shown.err
    assert "1 replica(s) failed (not serving)" in shown.out and victim.id in shown.out
    assert "replacing at" in shown.out

    after = await wait_until(lambda: running(stack, 2), GRACE + 15, "a replacement RUNNING")
    took = time.monotonic() - t0
    assert victim.id not in after
    assert took >= GRACE - 0.5, f"replaced after {took:.1f} s, before the {GRACE} s grace period"
    assert await stack.store.claims_consistent() == []
    assert await stack.store.failures() == {}
    assert stack.crashed() == []


async def test_repeated_failures_of_a_model_back_off(stack: Stack) -> None:
    stack.start_workers("fleet", "--count", "2", "--gpus", "2", "--heartbeat-interval", "0.2")
    stack.start_services()
    await stack.wait_ready(workers=2)
    await stack.scale(MODEL, 1)
    first = await wait_until(lambda: running(stack, 1), 30, "1 RUNNING replica")
    gaps = []
    current = first[0]
    for _ in range(2):
        inst = next(i for i in await stack.instances("svc") if i.id == current)
        assert inst.worker is not None
        await fail(stack, inst.id, inst.worker, "crashed")
        t0 = time.monotonic()

        async def replaced(old: str = current) -> list[str] | None:
            ids = await running(stack, 1)
            return ids if ids and ids[0] != old else None

        current = (await wait_until(replaced, 40, "the replacement RUNNING"))[0]
        gaps.append(time.monotonic() - t0)
    # grace 3 s, then grace + 2 s: the second replacement of the model waits longer.
    assert gaps[1] > gaps[0] + 1.0, gaps
