"""Done-when 1: scale a model 0 → 6 → 2 → 0 through the four services on real NATS and Redis."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from shared.bus import subjects
from shared.bus.messages import InstanceEvents, decode
from shared.core.placement.domain import GIB, InstanceState, ModelSpec, PlacementStrategy

from .conftest import Stack, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

LLAMA = ModelSpec(
    name="llama", source="meta/llama-8b", weight_bytes=16 * GIB, placement_strategy=PlacementStrategy.SPREAD
)


async def running_exactly(stack: Stack, model: str, n: int) -> bool:
    insts = await stack.instances(model)
    return len(insts) == n and all(i.state is InstanceState.RUNNING for i in insts)


async def test_scale_up_down_and_selectors(stack: Stack) -> None:
    stack.start_workers("plain", "--count", "4", "--gpus", "2", "--prefix", "w", "--heartbeat-interval", "0.2")
    stack.start_workers(
        "gold", "--count", "2", "--gpus", "2", "--prefix", "g", "--label", "tier=gold", "--heartbeat-interval", "0.2"
    )
    stack.start_services()
    await stack.wait_ready(workers=6)

    # 0 → 6: spread over the 6 workers of the cluster, one replica each.
    await stack.scale(LLAMA, 6)
    await wait_until(lambda: running_exactly(stack, "llama", 6), 30, "6 RUNNING llama replicas")
    per_worker = Counter(i.worker for i in await stack.instances("llama"))
    assert len(per_worker) == 6, f"spread should use 6 distinct workers: {per_worker}"

    # 6 → 2: four drained then deleted; the ledger holds exactly two replicas' claims.
    await stack.scale(LLAMA, 2, with_spec=False)
    await wait_until(lambda: running_exactly(stack, "llama", 2), 30, "2 RUNNING llama replicas")
    held = sum(used for used, _ in (await stack.store.ledger()).values())
    assert held == 2 * int(0.9 * 80 * GIB)

    # 2 → 0.
    await stack.scale(LLAMA, 0, with_spec=False)
    await wait_until(lambda: running_exactly(stack, "llama", 0), 30, "no llama replicas")
    assert all(used == 0 for used, _ in (await stack.store.ledger()).values())

    # A label selector: only the gold workers qualify (and model names may be dotted, like real ones).
    gold = ModelSpec(name="gold-model-3.1", source="x/gold", weight_bytes=8 * GIB, worker_selector={"tier": "gold"})
    await stack.scale(gold, 3)
    await wait_until(lambda: running_exactly(stack, gold.name, 3), 30, "3 RUNNING gold replicas")
    assert {i.worker for i in await stack.instances(gold.name)} <= {"g0", "g1"}

    # An impossible model stays PENDING with the core's explanation.
    huge = ModelSpec(name="huge", source="x/huge", vram_claim=500 * GIB)
    await stack.scale(huge, 1)

    async def pending_with_reason() -> str | None:
        insts = await stack.instances("huge")
        if len(insts) == 1 and insts[0].state is InstanceState.PENDING and insts[0].reason:
            return insts[0].reason
        return None

    reason = await wait_until(pending_with_reason, 20, "huge PENDING with a reason")
    assert "GiB" in reason, reason
    assert stack.crashed() == []


async def test_start_up_progress_travels_apart_from_what_instances_hold(stack: Stack) -> None:
    seen: list[tuple[str, InstanceState]] = []

    async def on_instances(msg: Any) -> None:
        for ev in decode(msg.data, InstanceEvents).events:
            seen.append((msg.subject, ev.instance.state))

    await stack.nc.subscribe(subjects.EVENT_INSTANCE_ALL, cb=on_instances)
    stack.start_workers("plain", "--count", "2", "--gpus", "2", "--prefix", "w", "--heartbeat-interval", "0.2")
    stack.start_services()
    await stack.wait_ready(workers=2)

    await stack.scale(LLAMA, 2)
    await wait_until(lambda: running_exactly(stack, "llama", 2), 30, "2 RUNNING llama replicas")

    def of(subject: str) -> Counter[InstanceState]:
        return Counter(state for on, state in seen if on == subject)

    async def both_running() -> bool:  # the ledger moves before the event is published
        return of(subjects.EVENT_INSTANCE_PROGRESS)[InstanceState.RUNNING] >= 2

    await wait_until(both_running, 30, "RUNNING of both replicas on the progress subject")
    await asyncio.sleep(0.5)  # anything published late (a duplicate, a stray subject) shows up too
    progress, changed = of(subjects.EVENT_INSTANCE_PROGRESS), of(subjects.EVENT_INSTANCE)
    assert progress == {InstanceState.STARTING: 2, InstanceState.RUNNING: 2}
    assert changed[InstanceState.SCHEDULED] == 2 and set(changed) <= {InstanceState.PENDING, InstanceState.SCHEDULED}
