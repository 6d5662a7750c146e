"""Done-when 5: bad input is dead-lettered with a reason; the service keeps running and valid work flows."""

from __future__ import annotations

import pytest

from shared.bus import subjects
from shared.bus.messages import Heartbeat, ScaleCommand, encode
from shared.core.placement.domain import GIB, GpuUsage, InstanceState, ModelSpec

from .conftest import Stack, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MODEL = ModelSpec(name="ok-model", source="x/ok", weight_bytes=8 * GIB)


async def publish_js(stack: Stack, subject: str, data: bytes, msg_id: str) -> None:
    await stack.nc.jetstream().publish(subject, data, headers={"Nats-Msg-Id": msg_id})


async def dead_letter_with(stack: Stack, service: str, fragment: str) -> bool:
    return any(e.service == service and fragment in e.reason for e in stack.dead_letters)


async def a_replica_runs(stack: Stack, model: str, n: int) -> bool:
    insts = await stack.instances(model)
    return len(insts) == n and all(i.state is InstanceState.RUNNING for i in insts)


CASES = [
    ("malformed-json", subjects.SCALE, b"{not json", "reconciler", "invalid ScaleCommand"),
    ("wrong-types", subjects.SCALE, b'{"model": 5, "replicas": "three"}', "reconciler", "invalid ScaleCommand"),
    ("unknown-model", subjects.SCALE, encode(ScaleCommand(model="ghost", replicas=2)), "reconciler", "unknown model"),
    (
        "negative-replicas",
        subjects.SCALE,
        encode(ScaleCommand(model="ok-model", replicas=-3, spec=MODEL)),
        "reconciler",
        "Expected `int` >= 0 - at `$.replicas`",
    ),
    (
        "huge-replicas",  # issue 12 case 1: it used to make converge_up loop and brick Redis
        subjects.SCALE,
        b'{"model": "ok-model", "replicas": 123456789012345678901234567890123456789}',
        "reconciler",
        "invalid ScaleCommand",
    ),
    ("pipeline-garbage", subjects.PLACEMENT_REQUESTED, b"\x00\x01garbage", "filter", "invalid PlacementRequest"),
    ("cordon-unknown-worker", subjects.CORDON, b'{"worker": "nowhere"}', "reconciler", "unknown worker"),
]


async def test_bad_input_is_dead_lettered_and_valid_work_continues(stack: Stack) -> None:
    stack.start_workers("fleet", "--count", "3", "--gpus", "2", "--heartbeat-interval", "0.2")
    stack.start_services()
    await stack.wait_ready(workers=3)
    for n, (name, subject, data, service, fragment) in enumerate(CASES, start=1):
        replicas = n if n <= 6 else n - 6  # the fleet has 6 GPUs: past them, valid work is a scale-down
        await publish_js(stack, subject, data, f"bad-{name}")
        await wait_until(lambda s=service, f=fragment: dead_letter_with(stack, s, f), 15, f"dead letter for {name}")
        # A valid command right after is processed.
        await stack.scale(MODEL, replicas)
        await wait_until(lambda n=replicas: a_replica_runs(stack, "ok-model", n), 20, f"{replicas} after {name}")
    assert stack.crashed() == []


HEARTBEATS = [
    ("unknown-gpu", encode(Heartbeat(worker="w0", gpus=(GpuUsage(index=42, vram_used=0),))), "unknown GPUs [42]"),
    ("unknown-worker", encode(Heartbeat(worker="stranger")), "unknown worker 'stranger'"),
    ("gpu-twice", encode(Heartbeat(worker="w0", gpus=(GpuUsage(index=0, vram_used=0),) * 2)), "duplicate GPU indexes"),
    ("wrong-types", b'{"worker": ["w0"]}', "invalid Heartbeat"),
    ("malformed", b"\xff\xfe", "invalid Heartbeat"),
]


async def test_bad_heartbeats_are_dead_lettered_and_good_ones_still_recorded(stack: Stack) -> None:
    stack.start_workers("fleet", "--count", "1", "--gpus", "2", "--heartbeat-interval", "0.2")
    stack.start_service("reconciler")
    await wait_until(lambda: stack.store.worker_names(), 20, "registered worker")
    # heartbeats are core NATS (no replay): the reconciler's heartbeat subscription must be live before the first
    # bad one is sent, which a heartbeat recorded after the registration shows (on a loaded CI host it was not yet)
    registered = (await stack.store.workers())[0].last_heartbeat

    async def beating() -> bool:
        return (await stack.store.workers())[0].last_heartbeat > registered

    await wait_until(beating, 15, "a heartbeat recorded after the registration")
    for name, payload, fragment in HEARTBEATS:
        await stack.nc.publish(subjects.worker_heartbeat("stranger" if name == "unknown-worker" else "w0"), payload)
        await wait_until(lambda f=fragment: dead_letter_with(stack, "reconciler", f), 30, f"dead letter for {name}")
        # The writer keeps going: w0's next heartbeat is still recorded.
        before = (await stack.store.workers())[0].last_heartbeat

        async def newer(b: float = before) -> bool:
            return (await stack.store.workers())[0].last_heartbeat > b

        await wait_until(newer, 15, f"a later heartbeat recorded after {name}")
    assert stack.crashed() == []
