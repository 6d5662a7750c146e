"""A durable publish larger than its stream's byte limit is refused with the same answer as a full stream ("maximum
bytes exceeded"), but no amount of draining makes room for it. Taken for back-pressure, the stage that made it held
its batch for ever: that message's input and every valid message of its batch, and the stage's pull loop (nothing
behind them was handled either). It is a failure of that message instead (``TooLarge``): its input is dead-lettered
alone, the rest of its batch is handled, and the reconciler leaves a request too large for the stream PENDING with
the reason.

On the session's real NATS (the server's answers and its accounting of a stored message's size), with the pipeline's
streams made small (``GANTRY_PIPE_MAX_BYTES``)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client

from ops.servers import ServerProcess
from shared.bus import streams, subjects
from shared.bus.messages import PlacementScored
from shared.bus.runtime import Bus, Publish, StreamFull, TooLarge, prepare
from shared.host import isolation
from shared.host.isolation import isolating
from shared.settings import Settings
from tests.unit.services.test_backpressure import FakeMsg

LIMIT = 2048  # bytes each pipeline stream holds


def settings_for(url: str, storage: str) -> Settings:
    return Settings(nats_url=url, js_storage=storage, pipe_max_bytes=LIMIT)


@pytest.fixture(params=["memory", "file"])
async def bus(request: pytest.FixtureRequest, nats_server: ServerProcess) -> AsyncIterator[Bus]:
    settings = settings_for(nats_server.url, request.param)
    nc = await nats.connect(nats_server.url)
    await streams.delete_streams(nc.jetstream())
    await prepare(nc, settings, [(streams.STREAM_SCORED, streams.CONSUMER_COMMIT, subjects.PLACEMENT_SCORED)])
    yield Bus(nc, "probe", stream_bytes=streams.stream_limits(settings), storage=settings.js_storage)
    await streams.delete_streams(nc.jetstream())
    await nc.close()


def scored(batch_id: str, pad: int) -> PlacementScored:
    return PlacementScored(batch_id=batch_id + "x" * pad, outcomes=())


async def largest_storable(nc: Client) -> int:
    """The largest padding of ``scored`` the empty stream takes with a 6-character message id (found by asking it),
    then emptied again."""
    js = nc.jetstream()
    lo, hi = 0, LIMIT
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            await Bus(nc, "probe").publish_js(subjects.PLACEMENT_SCORED, scored("p", mid), f"p{mid:05d}")
            lo = mid
        except StreamFull:
            hi = mid - 1
        await js.purge_stream(streams.STREAM_SCORED)
    return lo


async def test_a_publish_larger_than_its_stream_is_too_large_and_one_that_fits_an_empty_stream_is_back_pressure(
    bus: Bus,
) -> None:
    pad = await largest_storable(bus.nc)
    assert 0 < pad < LIMIT
    with pytest.raises(TooLarge):  # one byte more than the empty stream takes: it never will
        await bus.publish_js(subjects.PLACEMENT_SCORED, scored("p", pad + 1), "big000")
    await bus.publish_js(subjects.PLACEMENT_SCORED, scored("s", 10), "small")  # part of the room taken
    with pytest.raises(StreamFull) as full:  # fits once the stream is drained: back-pressure
        await bus.publish_js(subjects.PLACEMENT_SCORED, scored("p", pad), "fits00")
    assert not isinstance(full.value, TooLarge)


async def test_publishing_many_names_the_too_large_ones_and_the_ones_refused_for_room(bus: Bus) -> None:
    js = bus.nc.jetstream()
    for n in itertools.count():  # fill it with small ones
        try:
            await js.publish(subjects.PLACEMENT_SCORED, b"{}", headers={"Nats-Msg-Id": f"fill-{n}"})
        except nats.js.errors.APIError:
            break
    items: list[Publish] = [
        (subjects.PLACEMENT_SCORED, scored("big", 4 * LIMIT), "big"),
        (subjects.PLACEMENT_SCORED, scored("small", 0), "small"),
    ]
    with pytest.raises(TooLarge) as raised:
        await bus.publish_js_many(items)
    assert [i for _, _, i in raised.value.rest] == ["big"]
    assert [i for _, _, i in raised.value.full] == ["small"]


@dataclass
class Stage:
    """What isolation needs of a service, with the real bus (its dead letters recorded)."""

    real: Bus
    settings: Settings
    name: str = "probe"
    dead: list[str] = field(default_factory=list)

    @property
    def bus(self) -> Any:
        stage = self

        class Recording:
            async def publish_js_many(self, items: list[Publish]) -> None:
                await stage.real.publish_js_many(items)

            async def dead_letter(self, subject: str, reason: str, payload: bytes = b"") -> None:
                stage.dead.append(reason)

        return Recording()


async def test_a_stage_whose_output_never_fits_dead_letters_that_input_alone_and_handles_the_rest(
    bus: Bus, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(isolation, "HOLD_PAUSE_S", (0.01, 0.05))
    stage = Stage(bus, Settings(ack_wait_s=2.0, pipe_max_bytes=LIMIT))

    async def handler(raws: list[Any]) -> None:  # an output per input, as scoring's; input b"big" makes a huge one
        out = [(subjects.PLACEMENT_SCORED, scored(r.data.decode(), 4 * LIMIT if r.data == b"big" else 0),
                f"out-{r.data.decode()}") for r in raws]
        await stage.real.publish_js_many(out)
        for r in raws:  # as the host's ``consume`` does once the work is done
            await r.ack()

    raws = [FakeMsg(b"a"), FakeMsg(b"big"), FakeMsg(b"c")]
    await asyncio.wait_for(isolating(stage, subjects.PLACEMENT_FITTED, handler)(raws), 10)  # type: ignore[arg-type]
    assert [(r.acks, r.terms, r.naks) for r in raws] == [(1, 0, 0), (0, 1, 0), (1, 0, 0)]
    assert len(stage.dead) == 1 and "TooLarge" in stage.dead[0]
