"""Services only use the streams and durable consumers the launcher provisions (as the admin): started before
them, a service waits and says so, then runs once they exist."""

from __future__ import annotations

import pytest

from shared.bus import streams
from shared.bus.runtime import prepare
from shared.bus.streams import delete_streams
from shared.core.placement.domain import InstanceState, ModelSpec

from .conftest import Stack, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def test_a_service_started_before_provisioning_waits_for_it_then_runs(stack: Stack) -> None:
    await delete_streams(stack.nc.jetstream())
    stack.start_workers("fleet", "--count", "1", "--gpus", "1", "--prefix", "w", "--heartbeat-interval", "0.2")
    stack.start_services()
    log = stack.logs / "filter-0.log"

    async def waiting() -> bool:
        text = log.read_text(errors="replace") if log.exists() else ""
        return "waiting for GANTRY_PIPE" in text and "to be provisioned" in text

    await wait_until(waiting, 30, "the filter saying it waits for its stream")
    assert stack.crashed() == []
    assert not await _exists(stack, streams.STREAM_PIPE)  # the service created nothing itself
    await prepare(stack.nc, stack.launcher.settings, streams.ALL_CONSUMERS)
    await stack.wait_ready(workers=1)
    await stack.scale(ModelSpec(name="m", source="x/m", weight_bytes=1 << 30), 1)

    async def running() -> bool:
        return (await stack.states("m")).get(InstanceState.RUNNING, 0) == 1

    await wait_until(running, 30, "1 RUNNING")
    assert stack.crashed() == []


async def _exists(stack: Stack, stream: str) -> bool:
    return any(s.config.name == stream for s in await stack.nc.jetstream().streams_info())
