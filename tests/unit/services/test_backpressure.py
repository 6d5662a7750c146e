"""A full output stream is back-pressure, not a failure: the publishes it refused are named (``StreamFull``), and
the host holds the batch they came from (kept in progress, never nak'ed or dead-lettered) until the stream takes
them, then acks it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import pytest

from shared.bus.messages import PlacementRequest
from shared.bus.runtime import Bus, Publish, StreamFull, stream_full
from shared.host import isolation
from shared.host.isolation import hold, isolating, transient
from shared.settings import Settings

FULL = {"code": 503, "err_code": 10077, "description": "maximum bytes exceeded"}


def api_error(**err: Any) -> nats.js.errors.APIError:
    with pytest.raises(nats.js.errors.APIError) as raised:
        nats.js.errors.APIError.from_error(err)
    return raised.value


@pytest.mark.parametrize(("err", "full"), [
    (FULL, True),
    ({"code": 503, "err_code": 10077, "description": "maximum messages exceeded"}, True),
    ({"code": 503, "err_code": 10023, "description": "insufficient resources"}, True),
    ({"code": 500, "err_code": 10047, "description": "insufficient storage resources available"}, True),
    ({"code": 503, "err_code": 10077, "description": "some other store failure"}, False),
    ({"code": 400, "err_code": 10054, "description": "maximum message size exceeded"}, False),
    ({"code": 503, "err_code": None, "description": ""}, False),
])
def test_only_a_stream_without_room_counts_as_full(err: dict[str, Any], full: bool) -> None:
    assert stream_full(api_error(**err)) is full


def test_a_full_stream_is_never_a_reason_to_dead_letter() -> None:
    assert transient(StreamFull((("s", PlacementRequest(batch_id="b", items=(), specs={}), "id"),)))


@dataclass
class Reply:
    data: bytes


@dataclass
class FakeNats:
    """Answers JetStream publishes: refused (full) for the subjects in ``full``, stored for the others."""

    full: set[str] = field(default_factory=set)
    stored: list[str] = field(default_factory=list)

    def jetstream(self) -> None:
        return None

    async def request(self, subject: str, payload: bytes, timeout: float, headers: dict[str, str]) -> Reply:
        if subject in self.full:
            return Reply(msgspec.json.encode({"error": FULL}))
        self.stored.append(headers["Nats-Msg-Id"])
        return Reply(b'{"stream": "S", "seq": 1}')


def publishes(*subjects: str) -> list[Publish]:
    return [(s, PlacementRequest(batch_id=s, items=(), specs={}), f"id-{s}") for s in subjects]


async def test_publishing_many_names_the_ones_a_full_stream_refused_and_stores_the_others() -> None:
    nc = FakeNats(full={"b", "d"})
    bus = Bus(nc, "probe")  # type: ignore[arg-type]
    with pytest.raises(StreamFull) as raised:
        await bus.publish_js_many(publishes("a", "b", "c", "d"))
    assert [msg_id for _, _, msg_id in raised.value.rest] == ["id-b", "id-d"]
    assert nc.stored == ["id-a", "id-c"]
    assert "maximum bytes exceeded" in str(raised.value)


async def test_a_lone_publish_into_a_full_stream_raises_stream_full() -> None:
    bus = Bus(FakeNats(full={"a"}), "probe")  # type: ignore[arg-type]
    with pytest.raises(StreamFull) as raised:
        await bus.publish_js_many(publishes("a"))
    assert [msg_id for _, _, msg_id in raised.value.rest] == ["id-a"]


@dataclass
class Meta:
    num_delivered: int = 1


@dataclass
class FakeMsg:
    """What the host does with a pulled message: acked, nak'ed, terminated, or said to be in progress."""

    data: bytes = b"{}"
    is_acked: bool = False
    metadata: Meta = field(default_factory=Meta)
    acks: int = 0
    naks: int = 0
    terms: int = 0
    in_progress_calls: int = 0

    async def ack(self) -> None:
        self.acks += 1
        self.is_acked = True

    async def nak(self, delay: float | None = None) -> None:
        self.naks += 1
        self.is_acked = True

    async def term(self) -> None:
        self.terms += 1
        self.is_acked = True

    async def in_progress(self) -> None:
        self.in_progress_calls += 1


@dataclass
class FakeBus:
    """Refuses ``refusals`` publish rounds (full), then stores; records dead letters."""

    refusals: int
    rounds: list[list[str]] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)

    async def publish_js_many(self, items: list[Publish]) -> None:
        self.rounds.append([msg_id for _, _, msg_id in items])
        if self.refusals > 0:
            self.refusals -= 1
            raise StreamFull(tuple(items))

    async def dead_letter(self, subject: str, reason: str, payload: bytes = b"") -> None:
        self.dead.append(reason)


@dataclass
class FakeService:
    bus: FakeBus
    name: str = "probe"
    settings: Settings = field(default_factory=lambda: Settings(ack_wait_s=0.2))


@pytest.fixture(autouse=True)
def quick_pauses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(isolation, "HOLD_PAUSE_S", (0.02, 0.08))


async def test_a_held_batch_is_kept_in_progress_until_the_stream_takes_its_outputs_then_acked() -> None:
    service = FakeService(FakeBus(refusals=6))
    raws = [FakeMsg(), FakeMsg()]
    full = StreamFull(tuple(publishes("a", "b")))
    await hold(service, "subject", raws, full)  # type: ignore[arg-type]
    assert len(service.bus.rounds) == 7  # refused six times, then stored
    assert all(r.acks == 1 and r.naks == 0 and r.terms == 0 for r in raws)
    assert all(r.in_progress_calls >= 2 for r in raws)  # ~0.4 s held, a ping every 0.05 s
    assert service.bus.dead == []


async def test_a_handler_refused_by_a_full_stream_is_not_run_again_and_its_batch_is_never_nak_ed() -> None:
    service = FakeService(FakeBus(refusals=2))
    runs: list[int] = []

    async def handler(raws: list[Any]) -> None:
        runs.append(len(raws))
        raise StreamFull(tuple(publishes("out")))

    raws = [FakeMsg(), FakeMsg(), FakeMsg()]
    await isolating(service, "subject", handler)(raws)  # type: ignore[arg-type]
    assert runs == [3]  # held as a batch, not split to be handled one at a time
    assert service.bus.rounds == [["id-out"]] * 3
    assert all(r.acks == 1 and r.naks == 0 and r.terms == 0 for r in raws)


async def test_a_hold_that_loses_nats_settles_its_batch_as_any_failure_of_the_infrastructure() -> None:
    class Lost(FakeBus):
        async def publish_js_many(self, items: list[Publish]) -> None:
            raise nats.errors.ConnectionClosedError

    service = FakeService(Lost(refusals=0))
    raws = [FakeMsg()]
    await hold(service, "subject", raws, StreamFull(tuple(publishes("a"))))  # type: ignore[arg-type]
    assert raws[0].naks == 1 and raws[0].acks == 0 and service.bus.dead == []


async def test_the_pull_loop_waits_on_a_hold_so_the_stage_pulls_nothing_more() -> None:
    service = FakeService(FakeBus(refusals=3))

    async def handler(raws: list[Any]) -> None:
        raise StreamFull(tuple(publishes("out")))

    task = asyncio.ensure_future(isolating(service, "subject", handler)([FakeMsg()]))  # type: ignore[arg-type]
    await asyncio.sleep(0.03)
    assert not task.done()  # the loop awaits this call: no batch is pulled while it holds
    await task
    assert len(service.bus.rounds) == 4
