"""A pipeline stage down while its input fills the bus: once it starts, the pipeline drains.

The stream holding one stage's input is filled while that stage is down (fitting: `placement.filtered`; scoring:
`placement.fitted`, and the stages before it fill theirs in turn; filter: the requests), with the pipeline's byte
limit made small (`GANTRY_PIPE_MAX_BYTES`, as the provisioner applies it). The stage is kept down 5 s more (more
than two ack waits of what its upstream could not pass on, in the one-stream layout), then started: every replica
must be placed within a bound, and nothing dead-lettered (every message here is valid work).

When all four stages shared one stream, this stalled (the fitting case, measured): the full stream refused fitting's
output too, so fitting nak'ed its input and nothing downstream had anything to drain; 400 s after fitting started, 1
replica of 48 was placed and 47 messages of valid work had been dead-lettered after their 6 deliveries, while the
converge's re-requests kept the stream full until messages would age out (10 min).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from shared.bus import streams, subjects
from shared.bus.messages import ErrorEvent
from shared.bus.runtime import prepare
from shared.core.placement.domain import GIB, InstanceState, ModelSpec

from .conftest import Stack, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(240)]

WORKERS, GPUS = 8, 8
MODELS = 48  # one replica each, one GPU each: 48 of the 64 GPUs
LIMIT = 24 << 10  # bytes a pipeline stream holds: a few dozen of these requests and filter results
DOWN_AFTER_FULL_S = 5.0  # the stage stays down this long once its input is full (two ack waits and more)
DRAIN_BOUND_S = 30.0


def lost_work(stack: Stack) -> list[ErrorEvent]:
    """Dead letters of valid work: scale commands and pipeline messages (not the fleet's first heartbeats, heard
    before the state writer stored the workers)."""
    valid = (f"{subjects.PREFIX}.placement.", f"{subjects.PREFIX}.cmd.")
    return [d for d in stack.dead_letters if d.subject.startswith(valid)]


def llm(n: int) -> ModelSpec:
    return ModelSpec(name=f"full{n}", source=f"org/full{n}", weight_bytes=14 * GIB)  # a whole GPU each


async def stream_of(stack: Stack, subject: str) -> tuple[str, int]:
    """The stream that stores ``subject``, and the bytes it holds."""
    js = stack.nc.jetstream()
    name = await js.find_stream_name_by_subject(subject)
    return name, (await js.stream_info(name)).state.bytes


INPUT = {"filter": subjects.PLACEMENT_REQUESTED, "fitting": subjects.PLACEMENT_FILTERED,
         "scoring": subjects.PLACEMENT_FITTED}
"""The input of each stage a test keeps down."""


async def input_full(stack: Stack, down: str) -> bool:
    """The stopped stage's input stream is (nearly) full."""
    _, held = await stream_of(stack, INPUT[down])
    return held >= LIMIT * 3 // 4


async def all_running(stack: Stack) -> Counter[InstanceState] | None:
    insts = await stack.instances()
    states = Counter(i.state for i in insts)
    if len({i.model for i in insts}) == MODELS and states == Counter({InstanceState.RUNNING: MODELS}):
        return states
    return None


@pytest.mark.parametrize("down", ["fitting", "scoring", "filter"])
async def test_a_stage_started_after_its_input_filled_the_bus_drains_it_with_nothing_dead_lettered(
    stack: Stack, down: str,
) -> None:
    settings = stack.launcher.settings.model_copy(update={"pipe_max_bytes": LIMIT})
    await prepare(stack.nc, settings, streams.ALL_CONSUMERS)  # the provisioner's step, with the small limit
    stack.env["GANTRY_PIPE_MAX_BYTES"] = str(LIMIT)
    stack.start_workers(
        "fleet", "--count", str(WORKERS), "--gpus", str(GPUS), "--heartbeat-interval", "0.2",
        "--start-delay", "0.05", "--download-delay", "0.05",
    )
    for service in ("filter", "fitting", "scoring", "reconciler"):
        if service != down:
            stack.start_service(service)
    await stack.wait_ready(workers=WORKERS, timeout=60)

    for n in range(MODELS):  # one request (and one filter result) per model: the linger does not gather them
        await stack.scale(llm(n), 1)
        await asyncio.sleep(0.05)
    await wait_until(lambda: input_full(stack, down), 30, f"{down}'s input full")
    await asyncio.sleep(DOWN_AFTER_FULL_S)
    held_back = len(lost_work(stack))

    started = time.monotonic()
    stack.start_service(down)

    async def report() -> str:
        insts = await stack.instances()
        lost = lost_work(stack)
        reasons = Counter(f"{d.service} {d.subject}: {d.reason.split(':')[0]}" for d in lost)
        return (f"{Counter(i.state for i in insts)} after {time.monotonic() - started:.1f} s; "
                f"{len(lost)} dead letters ({held_back} while {down} was down): {dict(reasons)}")

    try:
        await wait_until(lambda: all_running(stack), DRAIN_BOUND_S, f"all {MODELS} replicas RUNNING", interval=0.2)
    except AssertionError as err:
        raise AssertionError(f"{err}: {await report()}") from None
    print(f"drained: {await report()}")
    assert lost_work(stack) == [], await report()
    assert await stack.store.overbooked() == []
    assert stack.crashed() == []
