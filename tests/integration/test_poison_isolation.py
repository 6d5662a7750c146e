"""Poison isolation in the service host, against a real nats-server: whatever one message of a pulled batch
raises, that message alone is dead-lettered with the reason and terminated; the others are handled and acked.

A probe service runs on the host exactly as the placement services do (``PlacementService``: its pull loop,
``consume`` and the host's failure handling). Its handler applies requests in order and fails, as a buggy
handler would, on the message that carries a failure: the exception types the issue names, raised where a
real handler raises them (decoding, or handling a decoded message).
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgspec
import nats
import pytest
from nats.aio.client import Client

from ops.servers import ServerProcess
from shared.bus import streams, subjects
from shared.bus.messages import ErrorEvent, PlacementRequest, encode
from shared.bus.runtime import prepare
from shared.bus.streams import delete_streams
from shared.host.contract import Consumes
from shared.host.service import PlacementService
from shared.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

DEEP = b"[" * 2000 + b"]" * 2000
SETTLE_S = 8.0  # well below the first redelivery of a nak'ed batch plus its backoff (2 s + 4 s + ...)


# Failures a handler meets while handling one decoded message (the message names which, in its batch id).
HANDLER_FAILURES: dict[str, BaseException] = {
    "KeyError": KeyError("ghost-model"),
    "IndexError": IndexError("tuple index out of range"),
    "OverflowError": OverflowError("Python int too large to convert to C long"),
    "RecursionError": RecursionError("maximum recursion depth exceeded"),
    "ZeroDivisionError": ZeroDivisionError("division by zero"),
    "ValueError": ValueError("anything else"),
}


class Probe(PlacementService):
    """A host service consuming placement requests; it applies each request or fails on a poisoned one."""

    name = "probe"
    consumes = (
        Consumes(subjects.PLACEMENT_REQUESTED, PlacementRequest, "requests to apply",
                 stream=streams.STREAM_REQUESTED, durable=streams.CONSUMER_FILTER),
    )

    def __init__(self, settings: Settings) -> None:
        self.applied: list[str] = []
        self.flaky_left: dict[str, int] = {}
        super().__init__(settings)

    def register(self) -> None:
        """One pull consumer, as the filter service has."""

        async def on_requested(raws: list[Any]) -> None:
            await self.consume(raws, PlacementRequest, subjects.PLACEMENT_REQUESTED, self.handle)

        self.pull(streams.STREAM_REQUESTED, streams.CONSUMER_FILTER, subjects.PLACEMENT_REQUESTED, on_requested)

    async def handle(self, batch: Sequence[PlacementRequest]) -> None:
        """Apply requests in order; a poisoned one raises its failure (the ones before it were applied)."""
        for req in batch:
            kind, _, _ = req.batch_id.partition(":")
            if kind in HANDLER_FAILURES:
                raise HANDLER_FAILURES[kind]
            if kind == "hang":
                await asyncio.Event().wait()  # a handler stuck on this message (an await that never ends)
            if kind == "flaky" and self.flaky_left.get(req.batch_id, 0) > 0:
                self.flaky_left[req.batch_id] -= 1
                raise ConnectionError("redis went away")  # the infrastructure, not the message
            self.applied.append(req.batch_id)


@dataclass
class Harness:
    """The probe on a fresh bus, and what reached the dead-letter subject."""

    nc: Client
    settings: Settings
    dead_letters: list[ErrorEvent] = field(default_factory=list)
    probe: Probe | None = None

    async def publish(self, batch_id: str, raw: bytes | None = None, headers: dict[str, str] | None = None) -> None:
        """A placement request (or raw bytes) on JetStream, before the probe starts: one pulled batch."""
        body = raw if raw is not None else encode(PlacementRequest(batch_id=batch_id, items=(), specs={}))
        await self.nc.jetstream().publish(
            subjects.PLACEMENT_REQUESTED, body, headers={"Nats-Msg-Id": batch_id, **(headers or {})}
        )

    async def start(self, flaky: dict[str, int] | None = None) -> Probe:
        """Start the probe (its pull loop takes everything published so far as one batch); ``flaky``: how
        many times each named request meets a failure of the infrastructure first."""
        self.probe = Probe(self.settings)
        self.probe.flaky_left.update(flaky or {})
        await self.probe.app.start()
        return self.probe

    async def settled(self) -> bool:
        """Nothing left to deliver and nothing delivered but unacknowledged."""
        info = await self.nc.jetstream().consumer_info(streams.STREAM_REQUESTED, streams.CONSUMER_FILTER)
        return info.num_pending == 0 and info.num_ack_pending == 0

    def dead(self, fragment: str) -> list[ErrorEvent]:
        """Dead letters from the probe whose reason holds ``fragment``."""
        return [e for e in self.dead_letters if e.service == "probe" and fragment in e.reason]


async def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
async def harness(nats_server: ServerProcess, redis_server: ServerProcess) -> AsyncIterator[Harness]:
    settings = Settings(
        nats_url=nats_server.url, redis_url=redis_server.url, ack_wait_s=2.0, max_deliver=6, js_storage="memory"
    )
    nc = await nats.connect(nats_server.url)
    await delete_streams(nc.jetstream())
    await prepare(nc, settings, streams.ALL_CONSUMERS)
    h = Harness(nc=nc, settings=settings)

    async def on_dead_letter(msg: Any) -> None:
        h.dead_letters.append(msgspec.json.decode(msg.data, type=ErrorEvent))

    await nc.subscribe(subjects.DEAD_LETTER_ALL, cb=on_dead_letter)
    try:
        yield h
    finally:
        if h.probe is not None:
            await h.probe.app.stop()
        await delete_streams(nc.jetstream())
        await nc.close()
        gc.unfreeze()  # the host froze this test process's heap at start-up, as it does a service's
        gc.set_threshold(700, 10, 10)


@pytest.mark.parametrize("kind", sorted(HANDLER_FAILURES))
async def test_a_message_the_handler_fails_on_is_dead_lettered_alone_and_the_others_are_applied(
    harness: Harness, kind: str
) -> None:
    await harness.publish("valid:1")
    await harness.publish(f"{kind}:poison")
    await harness.publish("valid:2")
    probe = await harness.start()
    await wait_until(lambda: _applied(probe, "valid:1", "valid:2"), SETTLE_S, "both valid requests applied")
    await wait_until(harness.settled, SETTLE_S, "every message acked or terminated")
    [letter] = harness.dead(kind)
    assert letter.subject == subjects.PLACEMENT_REQUESTED
    assert letter.reason.startswith(f"handling failed: {kind}")
    assert f"{kind}:poison" in letter.payload
    assert f"{kind}:poison" not in probe.applied


async def test_a_message_nested_2000_deep_is_dead_lettered_alone_and_the_others_are_applied(
    harness: Harness,
) -> None:
    await harness.publish("valid:1")
    await harness.publish("deep", raw=b'{"batch_id": "deep", "items": [], "specs": {}, "x": ' + DEEP + b"}")
    await harness.publish("valid:2")
    probe = await harness.start()
    await wait_until(lambda: _applied(probe, "valid:1", "valid:2"), SETTLE_S, "both valid requests applied")
    await wait_until(harness.settled, SETTLE_S, "every message acked or terminated")
    [letter] = harness.dead("invalid PlacementRequest")  # the decoder's RecursionError, reported as undecodable
    assert letter.payload.startswith('{"batch_id": "deep"')


async def test_a_message_with_a_64_kb_header_does_not_disturb_its_batch(harness: Harness) -> None:
    await harness.publish("valid:1")
    await harness.publish("valid:big-header", headers={"X-Padding": "p" * 64_000})
    await harness.publish(f"KeyError:{'q' * 100}", headers={"X-Padding": "p" * 64_000})
    await harness.publish("valid:2")
    probe = await harness.start()
    await wait_until(lambda: _applied(probe, "valid:1", "valid:big-header", "valid:2"), SETTLE_S, "valid applied")
    await wait_until(harness.settled, SETTLE_S, "every message acked or terminated")
    assert len(harness.dead("KeyError")) == 1


async def test_several_poison_messages_in_one_batch_are_each_dead_lettered(harness: Harness) -> None:
    kinds = sorted(HANDLER_FAILURES)
    for i, kind in enumerate(kinds):
        await harness.publish(f"valid:{i}")
        await harness.publish(f"{kind}:poison")
    probe = await harness.start()
    wanted = [f"valid:{i}" for i in range(len(kinds))]
    await wait_until(lambda: _applied(probe, *wanted), SETTLE_S, "every valid request applied")
    await wait_until(harness.settled, SETTLE_S, "every message acked or terminated")
    assert sorted(e.reason.split(":")[1].strip() for e in harness.dead("handling failed")) == kinds


async def test_an_infrastructure_failure_is_retried_not_dead_lettered(harness: Harness) -> None:
    await harness.publish("valid:1")
    await harness.publish("flaky:1")
    probe = await harness.start(flaky={"flaky:1": 1})  # Redis away on the first attempt only
    await wait_until(lambda: _applied(probe, "valid:1", "flaky:1"), 3 * SETTLE_S, "the flaky request applied")
    await wait_until(harness.settled, SETTLE_S, "every message acked")
    assert harness.dead_letters == []


async def _applied(probe: Probe, *batch_ids: str) -> bool:
    return all(b in probe.applied for b in batch_ids)


async def few_deliveries(harness: Harness) -> None:
    """Two deliveries a message (the second 2 s after the first times out), re-provisioned: a message cut off on each
    is dead-lettered within seconds."""
    harness.settings = harness.settings.model_copy(update={"max_deliver": 2})
    await prepare(harness.nc, harness.settings, streams.ALL_CONSUMERS)


async def test_a_message_whose_handling_never_ends_is_cut_off_and_its_batch_mates_are_applied(
    harness: Harness
) -> None:
    await few_deliveries(harness)
    await harness.publish("valid:1")
    await harness.publish("hang:poison")
    await harness.publish("valid:2")
    probe = await harness.start()
    await harness.publish("valid:3")  # behind the stuck batch
    await wait_until(lambda: _applied(probe, "valid:1", "valid:2", "valid:3"), 3 * SETTLE_S,
                     "the valid requests applied")
    stuck = lambda: [e for e in harness.dead("TooSlow") if "hang:poison" in e.payload]  # noqa: E731
    await wait_until(lambda: _async(bool(stuck())), 3 * SETTLE_S, "the stuck request dead-lettered")
    assert "gave up after 2 deliveries: TooSlow" in stuck()[0].reason
    # the ones behind the stuck one ran once: the batch was not redelivered while they were handled alone (the one
    # before it ran in the cut-off batch and again alone: handling is idempotent)
    assert probe.applied.count("valid:2") == probe.applied.count("valid:3") == 1
    await wait_until(harness.settled, SETTLE_S, "every message acked or terminated")
    await harness.publish("valid:4")  # the consumer goes on
    await wait_until(lambda: _applied(probe, "valid:4"), SETTLE_S, "a later request applied")


async def _async(value: bool) -> bool:
    return value


class Slow(Probe):
    """The probe, with a slow (healthy) kind of request, and a count of the requests it is handling right now
    (shared by every replica of a test: two at once on one request is a double handling)."""

    running: ClassVar[dict[str, int]] = {}
    overlaps: ClassVar[list[str]] = []

    async def handle(self, batch: Sequence[PlacementRequest]) -> None:
        for req in batch:
            self.running[req.batch_id] = self.running.get(req.batch_id, 0) + 1
            if self.running[req.batch_id] > 1:
                self.overlaps.append(req.batch_id)
            try:
                if req.batch_id.startswith("slow:"):
                    await asyncio.sleep(0.3 * self.settings.ack_wait_s)  # a slow Redis, say: healthy all the same
                await super().handle([req])
            finally:
                self.running[req.batch_id] -= 1


async def test_a_cut_off_batchs_messages_are_never_handled_by_a_sibling_while_still_held(harness: Harness) -> None:
    Slow.running.clear()
    Slow.overlaps.clear()
    await harness.publish("slow:0")
    await harness.publish("hang:1")
    await harness.publish("valid:2")
    a = Slow(harness.settings)
    harness.probe = a
    await a.app.start()
    await asyncio.sleep(0.3)  # replica a has pulled the batch of three
    b = Slow(harness.settings)  # a sibling replica, as every placement service runs with
    await b.app.start()
    try:
        await wait_until(lambda: _async("valid:2" in a.applied + b.applied), 3 * SETTLE_S, "valid:2 applied")
        await asyncio.sleep(2 * harness.settings.ack_wait_s)  # past the time a redelivery would have taken
    finally:
        await b.app.stop()
    # before, the in-progress refreshes left gaps longer than the ack wait: valid:2 went to b while a still held it
    assert (a.applied + b.applied).count("valid:2") == 1 and Slow.overlaps == []
