"""Issue 12 case 7: workers leave. A worker silent past ``forget_after`` is removed from the state and every
snapshot; `gantry workers remove NAME` removes a dead one at once and refuses a live one in one line."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import msgspec
import pytest

from shared.bus import subjects
from shared.bus.messages import WorkerRemovedEvent
from shared.core.placement.domain import GIB, InstanceState, ModelSpec, PlacementStrategy
from tests.integration.cli.conftest import run_cli

from .conftest import Stack, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# These tests rely on replicas spreading over empty workers, so the model names spread (the default packs).
MODEL = ModelSpec(name="svc", source="x/svc", weight_bytes=8 * GIB, placement_strategy=PlacementStrategy.SPREAD)


async def running_off(stack: Stack, n: int, worker: str) -> bool:
    insts = await stack.instances("svc")
    live = [i for i in insts if i.state is InstanceState.RUNNING and i.worker != worker]
    return len(live) == n


async def start(stack: Stack) -> list[WorkerRemovedEvent]:
    removed: list[WorkerRemovedEvent] = []

    async def on_removed(msg: Any) -> None:
        removed.append(msgspec.json.decode(msg.data, type=WorkerRemovedEvent))

    await stack.nc.subscribe(subjects.EVENT_WORKER_REMOVED, cb=on_removed)
    stack.start_workers("fleet", "--count", "2", "--gpus", "2", "--heartbeat-interval", "0.2")
    stack.start_workers("lonely", "--count", "1", "--gpus", "2", "--prefix", "x", "--heartbeat-interval", "0.2")
    stack.start_services()
    await stack.wait_ready(workers=3)
    await stack.scale(MODEL, 3)

    async def on_x0() -> bool:
        insts = await stack.instances("svc")
        return any(i.worker == "x0" and i.state is InstanceState.RUNNING for i in insts) and len(insts) == 3

    await wait_until(on_x0, 30, "a RUNNING replica on x0")
    return removed


async def gone_from_state(stack: Stack, worker: str) -> bool:
    names = await stack.store.worker_names()
    ledger = await stack.store.ledger()
    records = [i for i in await stack.instances() if i.worker == worker]
    return worker not in names and not any(f.startswith(worker + ":") for f in ledger) and not records


async def test_a_worker_silent_past_forget_after_leaves_the_state(stack: Stack) -> None:
    stack.env["GANTRY_FORGET_AFTER_S"] = "6"
    removed = await start(stack)
    stack.kill("lonely", signal.SIGKILL)
    # Its replica is replaced first (not_ready 1.5 s + reschedule 2 s), then the worker is forgotten.
    await wait_until(lambda: running_off(stack, 3, "x0"), 30, "3 RUNNING replicas off x0")
    await wait_until(lambda: gone_from_state(stack, "x0"), 30, "x0 and its lost replica gone from Redis")
    async def announced() -> bool:
        return bool(removed)

    await wait_until(announced, 15, "a worker-removed event")
    assert [e.worker for e in removed] == ["x0"]
    # Every service dropped it: a new replica never lands on a forgotten worker, and the ledger stays sound.
    await stack.scale(MODEL, 4, with_spec=False)
    await wait_until(lambda: running_off(stack, 4, "x0"), 20, "4 RUNNING replicas")
    assert await stack.store.claims_consistent() == []
    shown = await asyncio.to_thread(run_cli, ["workers", "--json"], stack.env)
    assert shown.code == 0 and '"x0"' not in shown.out
    assert stack.crashed() == []


async def test_workers_remove_refuses_a_live_worker_and_removes_a_dead_one(stack: Stack) -> None:
    removed = await start(stack)
    live = await asyncio.to_thread(run_cli, ["workers", "remove", "x0"], stack.env)
    assert live.code == 1
    assert live.err.strip().count("\n") == 0, live.err
    assert "x0 is alive" in live.err and "stop it first" in live.err
    unknown = await asyncio.to_thread(run_cli, ["workers", "remove", "nowhere"], stack.env)
    assert unknown.code == 1 and "unknown worker 'nowhere'" in unknown.err

    stack.kill("lonely", signal.SIGKILL)
    await wait_until(lambda: _not_ready(stack, "x0"), 30, "x0 NOT_READY")
    gone = await asyncio.to_thread(run_cli, ["workers", "remove", "x0"], stack.env)
    assert gone.code == 0, gone.err
    assert "removed x0" in gone.out
    assert await gone_from_state(stack, "x0")
    await wait_until(lambda: running_off(stack, 3, "x0"), 20, "its replica replaced elsewhere")
    assert [e.worker for e in removed] == ["x0"]
    assert await stack.store.claims_consistent() == []
    assert stack.crashed() == []


async def _not_ready(stack: Stack, worker: str) -> bool:
    shown = await asyncio.to_thread(run_cli, ["workers", "--json"], stack.env)
    rows = msgspec.json.decode(shown.out)
    return any(r["name"] == worker and r["state"] == "NOT_READY" for r in rows)
