"""Issue 12, item 9: every consumed subject fuzzed with 1,000 hostile payloads (malformed bytes and schema-shaped
hostile values); afterwards every service is alive and idle, nothing of the fuzz is stored, and a valid scale
converges within 5 s."""

from __future__ import annotations

import time

import pytest

from bench.adversary.fuzz import cpu_share, drained, draw, junk, payloads, publish_all, targets
from shared.core.placement.domain import GIB, InstanceState, ModelSpec

from .conftest import CONSUMERS, Stack, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PER_SUBJECT = 1000
MODEL = ModelSpec(name="fz", source="x/fz", weight_bytes=8 * GIB)


async def running(stack: Stack, n: int) -> bool:
    insts = await stack.instances("fz")
    return len(insts) == n and all(i.state is InstanceState.RUNNING for i in insts)


async def test_a_thousand_hostile_payloads_per_subject_leave_the_stack_alive_clean_and_working(stack: Stack) -> None:
    stack.start_workers("fleet", "--count", "2", "--gpus", "2", "--heartbeat-interval", "0.2")
    stack.start_services()
    await stack.wait_ready(workers=2)
    await stack.scale(MODEL, 1)
    await wait_until(lambda: running(stack, 1), 30, "the first replica")
    (inst,) = await stack.instances("fz")
    assert inst.worker is not None
    for n, target in enumerate(targets(inst.worker, MODEL, inst)):
        await publish_all(stack.nc, target, draw(payloads(target), PER_SUBJECT, seed=n), tag=f"ci-{n}")
    assert await drained(stack.nc, CONSUMERS, timeout=120), "JetStream consumers did not drain"
    time.sleep(1.0)  # core-NATS subscribers finish what they hold
    assert stack.crashed() == [] and all(p.poll() is None for p in stack.procs.values())
    scale_rejects = sum(1 for e in stack.dead_letters if e.subject == "gantry.cmd.scale")
    assert scale_rejects >= PER_SUBJECT * 0.95, scale_rejects  # the fuzz reached the service and was refused
    # Bookkeeping of messages still in flight (a retry entry for a forged id) is pruned by the next ticks:
    # junk is what is still there after them.
    async def clean() -> bool:
        return await junk(stack.store, {"w0", "w1"}, {"fz"}) == []

    await wait_until(clean, 15, f"no junk (last: {await junk(stack.store, {'w0', 'w1'}, {'fz'})})")
    services = {name: p.pid for name, p in stack.procs.items() if name != "fleet"}
    spin = {name: share for name, share in cpu_share(services, 2.0).items() if share > 0.3}
    assert spin == {}, f"busy while idle: {spin}"
    started = time.monotonic()
    await stack.scale(MODEL, 2)
    await wait_until(lambda: running(stack, 2), 5, "a valid scale after the fuzz")
    assert time.monotonic() - started < 5
    workers = await stack.store.workers()
    assert sorted(w.name for w in workers) == ["w0", "w1"]
    assert all(time.time() - w.last_heartbeat < 2 for w in workers), "a worker's heartbeats were refused"
