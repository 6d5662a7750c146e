"""Services only use the streams and durable consumers the launcher provisions (as the admin): started before
them, a service waits and says so, then runs once they exist."""

from __future__ import annotations

import dataclasses

import pytest

from shared.bus import streams, subjects
from shared.bus.messages import PlacementItem, PlacementRequest, encode
from shared.bus.runtime import prepare
from shared.bus.streams import consumer_config, delete_streams, stream_configs
from shared.core.placement.domain import InstanceState, ModelSpec
from shared.core.placement.lifecycle import ACTIVE
from shared.state.store import ScaleUp

from .conftest import Stack, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def test_a_service_started_before_provisioning_waits_for_it_then_runs(stack: Stack) -> None:
    await delete_streams(stack.nc.jetstream())
    stack.start_workers("fleet", "--count", "1", "--gpus", "1", "--prefix", "w", "--heartbeat-interval", "0.2")
    stack.start_services()
    log = stack.logs / "filter-0.log"

    async def waiting() -> bool:
        text = log.read_text(errors="replace") if log.exists() else ""
        return "waiting for GANTRY_PIPE_REQUESTED" in text and "to be provisioned" in text

    await wait_until(waiting, 30, "the filter saying it waits for its stream")
    assert stack.crashed() == []
    assert not await _exists(stack, streams.STREAM_REQUESTED)  # the service created nothing itself
    await prepare(stack.nc, stack.launcher.settings, streams.ALL_CONSUMERS)
    await stack.wait_ready(workers=1)
    await stack.scale(ModelSpec(name="m", source="x/m", weight_bytes=1 << 30), 1)

    async def running() -> bool:
        return (await stack.states("m")).get(InstanceState.RUNNING, 0) == 1

    await wait_until(running, 30, "1 RUNNING")
    assert stack.crashed() == []


async def _exists(stack: Stack, stream: str) -> bool:
    return any(s.config.name == stream for s in await stack.nc.jetstream().streams_info())


async def test_provisioning_retires_an_older_builds_pipeline_stream_and_its_replicas_are_placed(stack: Stack) -> None:
    """An older build kept every stage's input in one stream, GANTRY_PIPE (``gantry.placement.>``), which overlaps the
    stage streams' subjects. Provisioning deletes it, even holding a request in flight, and creates the stage streams;
    the replica that request was placing, PENDING in Redis, is requested again and placed."""
    js = stack.nc.jetstream()
    await delete_streams(js)
    legacy = dataclasses.replace(
        next(c for c in stream_configs(stack.launcher.settings) if c.name == streams.STREAM_REQUESTED),
        name=streams.LEGACY_PIPE, subjects=[subjects.PIPE_ALL],
    )
    await js.add_stream(legacy)
    await js.add_consumer(streams.LEGACY_PIPE, consumer_config(
        streams.CONSUMER_FILTER, subjects.PLACEMENT_REQUESTED, stack.launcher.settings))
    spec = ModelSpec(name="old", source="x/old", weight_bytes=1 << 30)
    # the older stack's state: the replica created PENDING, its request published into the old stream
    (made,) = await stack.store.converge_up([ScaleUp(model="old", replicas=1, spec=spec, seq=1)], ACTIVE)
    (replica,) = made.created
    request = PlacementRequest(batch_id="old", items=(PlacementItem(instance_id=replica.id, model="old"),),
                               specs={"old": spec})
    await js.publish(subjects.PLACEMENT_REQUESTED, encode(request))
    assert (await js.stream_info(streams.LEGACY_PIPE)).state.messages == 1

    await prepare(stack.nc, stack.launcher.settings, streams.ALL_CONSUMERS)
    assert not await _exists(stack, streams.LEGACY_PIPE)
    for stream in streams.PIPE_STREAMS:
        assert await _exists(stack, stream)
    await prepare(stack.nc, stack.launcher.settings, streams.ALL_CONSUMERS)  # again: nothing left to retire

    stack.start_workers("fleet", "--count", "1", "--gpus", "1", "--prefix", "w", "--heartbeat-interval", "0.2")
    stack.start_services()
    await stack.wait_ready(workers=1)

    async def placed() -> bool:
        return (await stack.states("old")).get(InstanceState.RUNNING, 0) == 1

    await wait_until(placed, 30, "the older stack's PENDING replica RUNNING")
    assert not [d for d in stack.dead_letters if d.subject.startswith(f"{subjects.PREFIX}.placement.")]
    assert stack.crashed() == []
