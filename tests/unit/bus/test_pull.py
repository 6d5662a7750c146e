"""The pull consumer's bookkeeping, driven by hand: what each arrival does to the open request, when a new one
goes out, and what happens to messages on the way out (with a real nats-server: tests/integration/test_pull_loop.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest
from nats.aio.msg import Msg

from shared.bus.pull import PULL_EXPIRES_S, REFUSED_PAUSE_S, UNAVAILABLE_PAUSE_S, PullConsumer


class FakeClient:
    """The few nats-py client calls the consumer makes, recorded."""

    def __init__(self) -> None:
        self.stats = {"reconnects": 0}
        self.published: list[tuple[str, dict[str, Any], str]] = []
        self.fail_publish = False

    def new_inbox(self) -> str:
        return "_INBOX.test"

    async def publish(self, subject: str, payload: bytes, reply: str = "") -> None:
        if self.fail_publish:
            raise ConnectionError("nats away")
        self.published.append((subject, msgspec.json.decode(payload), reply))

    async def subscribe(self, subject: str, cb: Any) -> Any:
        class Sub:
            async def unsubscribe(self) -> None:
                return None

        return Sub()


class Nakked(Msg):
    """A delivered message that records being handed back."""

    nakked = False
    kept = 0

    async def nak(self, delay: float | None = None) -> None:
        self.nakked = True

    async def in_progress(self) -> None:
        self.kept += 1


def message(data: bytes = b"x") -> Nakked:
    return Nakked(None, subject="s", data=data)  # type: ignore[arg-type]  # never reaches a client


def status(code: str, description: str = "") -> Msg:
    headers = {"Status": code, **({"Description": description} if description else {})}
    return Msg(None, subject="_INBOX.test", headers=headers)  # type: ignore[arg-type]


def consumer(batch: int = 4, linger: float = 0.0) -> tuple[PullConsumer, FakeClient, list[list[Msg]]]:
    nc = FakeClient()
    handled: list[list[Msg]] = []

    async def handler(msgs: list[Msg]) -> None:
        handled.append(msgs)

    return PullConsumer(nc, "S", "d", "s.>", batch, handler, linger), nc, handled  # type: ignore[arg-type]


async def test_a_request_asks_for_a_full_batch_on_the_consumers_next_subject() -> None:
    c, nc, _ = consumer(batch=7)
    await c.ask()
    assert nc.published == [("$JS.API.CONSUMER.MSG.NEXT.S.d", {"batch": 7, "expires": int(PULL_EXPIRES_S * 1e9)},
                             "_INBOX.test")]
    assert not c.lost()


async def test_each_message_uses_up_the_open_request_and_the_last_one_asks_again() -> None:
    c, nc, _ = consumer(batch=2)
    await c.ask()
    for _ in range(2):
        c.arrived.put_nowait(message())
    assert len(await c.next_batch()) == 2
    assert len(nc.published) == 2  # used up: a new request before the batch is handled


@pytest.mark.parametrize("code", ["408", "409"])
async def test_an_expired_or_closed_request_is_replaced_at_once(code: str) -> None:
    c, nc, _ = consumer()
    await c.ask()
    c.arrived.put_nowait(status(code))
    assert await c.next_batch() == []
    assert len(nc.published) == 2


async def test_jetstream_not_ready_is_asked_again_only_after_a_pause(slept: list[float]) -> None:
    c, nc, _ = consumer()
    await c.ask()
    c.arrived.put_nowait(status("503"))
    assert await c.next_batch() == []
    assert slept == [UNAVAILABLE_PAUSE_S] and len(nc.published) == 2
    c.arrived.put_nowait(message())
    await c.next_batch()
    assert slept == [UNAVAILABLE_PAUSE_S]  # the pause was for that one answer, not for good


async def test_a_reconnect_makes_the_open_request_lost_the_server_forgot_it() -> None:
    c, nc, _ = consumer()
    await c.ask()
    nc.stats["reconnects"] += 1
    assert c.lost()


async def test_a_request_not_sent_is_asked_again_by_the_idle_check() -> None:
    c, nc, _ = consumer()
    nc.fail_publish = True
    await c.ask()
    assert c.lost()
    nc.fail_publish = False
    await c.renew()
    assert len(nc.published) == 1 and not c.lost()


async def test_a_batch_never_exceeds_its_size_the_rest_waits_for_the_next() -> None:
    c, _, _ = consumer(batch=3)
    await c.ask()
    for _ in range(5):
        c.arrived.put_nowait(message())
    assert len(await c.next_batch()) == 3
    assert c.arrived.qsize() == 2


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every ``asyncio.sleep`` asked for, none taken."""
    asked: list[float] = []

    async def sleep(s: float) -> None:
        asked.append(s)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    return asked


@pytest.mark.parametrize("arrived", [1, 2], ids=["a lone message", "several"])
async def test_the_first_batch_after_a_quiet_spell_is_never_held_for_the_linger(
        arrived: int, slept: list[float]) -> None:
    c, _, _ = consumer(batch=8, linger=10.0)
    await c.ask()
    for _ in range(arrived):
        c.arrived.put_nowait(message())
    assert len(await c.next_batch()) == arrived and slept == []


async def test_a_partial_batch_right_after_another_lingers_to_gather_more(monkeypatch: pytest.MonkeyPatch) -> None:
    c, _, _ = consumer(batch=8, linger=0.25)
    c.last_start = time.monotonic()  # a batch just started: the next one waits for the rest of the linger
    late = message(b"late")

    async def sleep(s: float) -> None:
        c.arrived.put_nowait(late)  # arrives during the linger

    monkeypatch.setattr(asyncio, "sleep", sleep)
    await c.ask()
    c.arrived.put_nowait(message())
    c.arrived.put_nowait(message())
    got = await c.next_batch()
    assert len(got) == 3 and got[-1] is late


async def test_a_failing_handler_does_not_end_the_loop() -> None:
    nc = FakeClient()
    calls: list[int] = []

    async def handler(msgs: list[Msg]) -> None:
        calls.append(len(msgs))
        raise RuntimeError("handler bug")

    c = PullConsumer(nc, "S", "d", "s.>", 1, handler)  # type: ignore[arg-type]
    for _ in range(3):
        c.arrived.put_nowait(message())
    task = asyncio.ensure_future(c.run())
    while len(calls) < 3:
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == [1, 1, 1]


async def test_messages_delivered_but_not_handled_are_handed_back_when_the_loop_stops() -> None:
    nc = FakeClient()
    started = asyncio.Event()

    async def handler(msgs: list[Msg]) -> None:
        started.set()
        await asyncio.Event().wait()  # busy with the first batch when the service stops

    c = PullConsumer(nc, "S", "d", "s.>", 1, handler)  # type: ignore[arg-type]
    first, *waiting = message(), message(), message()
    for m in (first, *waiting):
        c.arrived.put_nowait(m)
    task = asyncio.ensure_future(c.run())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [m.nakked for m in waiting] == [True, True] and not first.nakked  # the handler owns its batch


@pytest.mark.parametrize("why", ["Exceeded MaxRequestExpires of 1s", "Consumer is push based", "Consumer Deleted",
                                 "Exceeded MaxWaiting"])
async def test_a_409_that_every_request_would_get_is_asked_again_only_after_a_growing_pause(
        slept: list[float], why: str, caplog: pytest.LogCaptureFixture) -> None:
    c, nc, _ = consumer()
    await c.ask()
    for _ in range(6):  # before: a new request at once each time, ~2,500 a second, nothing handled, nothing said
        c.arrived.put_nowait(status("409", why))
        assert await c.next_batch() == []
    assert slept == [0.5, 1.0, 2.0, 4.0, PULL_EXPIRES_S, PULL_EXPIRES_S] and len(nc.published) == 7
    assert [r.levelname for r in caplog.records if why in r.getMessage()] == ["ERROR"]  # said once, not per request
    c.arrived.put_nowait(message())  # the consumer is back as it should be
    await c.next_batch()
    assert c.pause == REFUSED_PAUSE_S[0]


async def test_a_consumer_that_allows_smaller_batches_is_asked_for_those(slept: list[float]) -> None:
    c, nc, _ = consumer(batch=64)
    await c.ask()
    c.arrived.put_nowait(status("409", "Exceeded MaxRequestBatch of 10"))
    assert await c.next_batch() == []
    assert slept == [] and nc.published[-1][1]["batch"] == 10


@pytest.mark.parametrize("keep_every", [0.02, 0.0], ids=["kept", "not asked to"])
async def test_while_a_batch_is_handled_the_messages_behind_it_are_kept_in_progress(keep_every: float) -> None:
    nc = FakeClient()
    release = asyncio.Event()
    handled: list[list[Msg]] = []

    async def handler(msgs: list[Msg]) -> None:
        handled.append(msgs)
        await release.wait()

    c = PullConsumer(nc, "S", "d", "s.>", 4, handler, keep_every=keep_every)  # type: ignore[arg-type]
    first, behind = message(b"first"), message(b"behind")
    task = asyncio.ensure_future(c._handle([first]))
    c.arrived.put_nowait(behind)
    c.arrived.put_nowait(status("408"))  # a notice has no delivery to keep
    await asyncio.sleep(0.15)
    release.set()
    await task
    assert first.kept == 0  # the batch itself is its handler's to keep
    assert (behind.kept >= 2) is (keep_every > 0)
    kept_at_end = behind.kept
    await asyncio.sleep(0.06)
    assert behind.kept == kept_at_end  # the keeping ends with the batch
