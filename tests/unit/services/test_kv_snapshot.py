"""A picker's warm start: an engine's prefix-cache snapshot replaces what is known of its cache, then only the
KV events numbered from the snapshot's ``next_seq`` on apply; a snapshot not signed by the instance it claims,
or answering another request, is refused."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import pytest

from shared.bus.messages import EngineKVEvents, EngineKVSnapshot, KVSnapshotRequest, decode, encode
from shared.core.kv_events import BlockRemoved, BlockStored, KVEventBatch
from shared.host.engine_feed import (
    SNAPSHOT_CHUNK,
    EngineFeed,
    Fetched,
    SnapshotFetcher,
    apply_snapshot,
    fetch_snapshot,
    fetch_snapshot_until_answered,
    take_metrics,
)
from shared.host.report_auth import SNAPSHOT, ReportSigner, derive_key, signed_headers
from tests.unit.services.test_report_auth import MASTER, NOW, RecordingBus, feed_with, report, signed, verifier


def stored(seq: int, *hashes: int) -> EngineKVEvents:
    batch = KVEventBatch(ts=NOW, events=[BlockStored(block_hashes=list(hashes), parent_block_hash=None,
                                                       token_ids=[0] * 16 * len(hashes), block_size=16)])
    return EngineKVEvents(instance_id="e1", model="m", seq=seq, batch=batch)


def removed(seq: int, *hashes: int) -> EngineKVEvents:
    batch = KVEventBatch(ts=NOW, events=[BlockRemoved(block_hashes=list(hashes))])
    return EngineKVEvents(instance_id="e1", model="m", seq=seq, batch=batch)


def snapshot(next_seq: int, hashes: list[int], nonce: str = "n" * 32, instance: str = "e1") -> EngineKVSnapshot:
    return EngineKVSnapshot(instance_id=instance, model="m", nonce=nonce, next_seq=next_seq, block_hashes=hashes,
                            total=len(hashes))


def holds(feed: EngineFeed, block: int) -> bool:
    state = feed.router.state
    return state.precise.holds(state.endpoints["e1"].slot, block)


async def joined(feed: EngineFeed) -> EngineFeed:
    await take_metrics(feed, RecordingBus(), signed("e1", report("e1", 8001)), NOW)
    return feed


@dataclass(frozen=True)
class Reply:
    data: bytes
    headers: dict[str, str] | None


class AnsweringBus(RecordingBus):
    """The NATS hop of a snapshot request: ``answer`` makes the reply from the request (the engine's side)."""

    def __init__(self, answer: Callable[[KVSnapshotRequest], Reply]) -> None:
        super().__init__()
        self.answer = answer

    async def request(self, subject: str, msg: msgspec.Struct, timeout_s: float) -> Reply:  # type: ignore[override]
        return self.answer(decode(encode(msg), KVSnapshotRequest))


class SlowBus(AnsweringBus):
    """An engine whose first ``late`` answers come after the asker stopped waiting (or never reach it)."""

    def __init__(self, answer: Callable[[KVSnapshotRequest], Reply], late: int) -> None:
        super().__init__(answer)
        self.late = late
        self.asked = 0

    async def request(self, subject: str, msg: msgspec.Struct, timeout_s: float) -> Reply:  # type: ignore[override]
        self.asked += 1
        if self.asked <= self.late:
            raise TimeoutError
        return await super().request(subject, msg, timeout_s)


def engine(hashes: list[int], key_of: str = "e1", sign: bool = True,
           nonce: str | None = None) -> Callable[[KVSnapshotRequest], Reply]:
    """An engine answering with ``hashes`` as of event 3, signed with ``key_of``'s key (or not at all), echoing the
    request's nonce (or ``nonce``)."""
    by = ReportSigner(derive_key(MASTER, key_of), int(NOW * 1e9))

    def answer(req: KVSnapshotRequest) -> Reply:
        data = encode(snapshot(3, hashes, nonce=nonce or req.nonce))
        return Reply(data, signed_headers(by if sign else None, SNAPSHOT, data))
    return answer


async def test_events_older_than_the_snapshot_are_ignored_and_newer_ones_applied() -> None:
    feed = await joined(feed_with(None))
    feed.on_kv(stored(0, 50))  # before the snapshot: what it says of block 50 is in the snapshot already
    assert await apply_snapshot(feed, snapshot(3, [1, 2]))
    assert holds(feed, 1) and holds(feed, 2) and not holds(feed, 50)
    feed.on_kv(stored(2, 60))  # covered by the snapshot, arriving late
    feed.on_kv(removed(3, 1))
    feed.on_kv(stored(4, 70))
    assert not holds(feed, 60) and not holds(feed, 1) and holds(feed, 2) and holds(feed, 70)


async def test_a_late_event_zero_is_old_when_restarts_are_seen_by_their_signatures() -> None:
    feed = await joined(feed_with(verifier()))
    assert await apply_snapshot(feed, snapshot(3, [1]))
    feed.on_kv(stored(0, 50))
    assert holds(feed, 1) and not holds(feed, 50)


async def test_events_arriving_while_a_snapshot_applies_follow_it_in_order() -> None:
    feed = await joined(feed_with(None))
    hashes = list(range(1, 3 * SNAPSHOT_CHUNK))
    applying = asyncio.create_task(apply_snapshot(feed, snapshot(3, hashes)))
    await asyncio.sleep(0)  # the first chunk is in
    feed.on_kv(removed(3, hashes[-1]))  # evicts a block of a chunk not applied yet
    feed.on_kv(stored(2, 99))  # covered by the snapshot
    assert await applying
    assert not holds(feed, hashes[-1]) and holds(feed, hashes[-2]) and not holds(feed, 99)
    assert feed._kv_seq["e1"] == 4


async def test_a_large_snapshot_yields_to_the_event_loop_between_chunks() -> None:
    feed = await joined(feed_with(None))
    turns = 0

    async def other_work() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(other_work())
    await asyncio.sleep(0)
    turns = 0
    assert await apply_snapshot(feed, snapshot(0, list(range(1, 10 * SNAPSHOT_CHUNK + 1))))
    ticker.cancel()
    assert turns >= 9


async def test_a_snapshot_older_than_events_already_applied_is_not_applied() -> None:
    feed = await joined(feed_with(None))
    for seq in range(5):
        feed.on_kv(stored(seq, 100 + seq))
    assert not await apply_snapshot(feed, snapshot(3, [1]))
    assert not holds(feed, 1) and holds(feed, 104)


async def test_a_signed_snapshot_is_fetched_and_applied() -> None:
    feed = await joined(feed_with(verifier()))
    dead = AnsweringBus(engine([1, 2]))
    assert await fetch_snapshot(feed, dead, "e1") is Fetched.APPLIED
    assert holds(feed, 1) and holds(feed, 2) and dead.dead == []


async def test_a_snapshot_signed_with_another_instances_key_is_refused() -> None:
    feed = await joined(feed_with(verifier()))
    dead = AnsweringBus(engine([1], key_of="e2"))
    assert await fetch_snapshot(feed, dead, "e1") is Fetched.NOT_APPLIED
    assert not holds(feed, 1)
    assert dead.dead == [("gantry.engine.kvsnap.e1", "claiming instance 'e1': not signed by the instance it claims")]


async def test_an_unsigned_snapshot_is_refused() -> None:
    feed = await joined(feed_with(verifier()))
    dead = AnsweringBus(engine([1], sign=False))
    assert await fetch_snapshot(feed, dead, "e1") is Fetched.NOT_APPLIED
    assert not holds(feed, 1) and len(dead.dead) == 1


async def test_a_recorded_snapshot_answering_another_request_is_refused() -> None:
    feed = await joined(feed_with(verifier()))
    dead = AnsweringBus(engine([1], nonce="r" * 32))
    assert await fetch_snapshot(feed, dead, "e1") is Fetched.NOT_APPLIED
    assert not holds(feed, 1) and len(dead.dead) == 1


async def test_an_engine_that_answers_too_late_is_asked_again_and_its_snapshot_applied() -> None:
    feed = await joined(feed_with(verifier()))
    bus = SlowBus(engine([1, 2]), late=2)
    assert await fetch_snapshot_until_answered(feed, bus, "e1", (1.0, 1.0, 1.0), 0.0) is Fetched.APPLIED
    assert bus.asked == 3 and holds(feed, 1) and holds(feed, 2)


async def test_an_engine_that_never_answers_is_asked_a_bounded_number_of_times() -> None:
    feed = await joined(feed_with(verifier()))
    bus = SlowBus(engine([1]), late=100)
    assert await fetch_snapshot_until_answered(feed, bus, "e1", (1.0, 1.0, 1.0), 0.0) is Fetched.NO_ANSWER
    assert bus.asked == 3 and not holds(feed, 1)


async def test_a_refused_snapshot_answer_is_not_asked_for_again() -> None:
    feed = await joined(feed_with(verifier()))
    bus = SlowBus(engine([1], key_of="e2"), late=0)
    assert await fetch_snapshot_until_answered(feed, bus, "e1", (1.0, 1.0, 1.0), 0.0) is Fetched.NOT_APPLIED
    assert bus.asked == 1 and len(bus.dead) == 1


async def test_an_engine_that_left_the_pool_is_not_asked_again() -> None:
    feed = await joined(feed_with(verifier()))
    asked: list[str] = []

    async def leave_after_first_ask(subject: str, msg: msgspec.Struct, timeout_s: float) -> Reply:
        asked.append(subject)
        feed.pool.endpoints.pop("e1")
        raise TimeoutError

    bus = SlowBus(engine([1]), late=100)
    bus.request = leave_after_first_ask  # type: ignore[method-assign]
    assert await fetch_snapshot_until_answered(feed, bus, "e1", (1.0, 1.0, 1.0), 0.0) is Fetched.NO_ANSWER
    assert asked == ["gantry.engine.kvsnap.e1"]


async def test_an_engine_becoming_routable_and_one_that_lost_events_are_asked_for_their_snapshot() -> None:
    asked: list[str] = []
    feed = feed_with(None)
    feed.want_snapshot = asked.append
    await joined(feed)
    feed.on_kv(stored(0, 1))
    feed.on_kv(stored(5, 2))  # 1 to 4 lost
    assert asked == ["e1", "e1"]


def test_the_largest_snapshot_fits_in_one_nats_message_and_a_larger_one_is_refused() -> None:
    from shared.bus.messages import MAX_SNAPSHOT_BLOCKS, MessageError

    largest = snapshot(0, [(1 << 64) - 1 - i for i in range(MAX_SNAPSHOT_BLOCKS)])
    assert len(encode(largest)) < 1 << 20  # nats-server's default max_payload
    raw = msgspec.to_builtins(largest)
    raw["block_hashes"].append(1)
    with pytest.raises(MessageError):
        decode(msgspec.json.encode(raw), EngineKVSnapshot)


class HeldBus(RecordingBus):
    """An engine answering its ``n``-th ask with ``answers[n]`` (next_seq, hashes), the first answer held until
    ``release`` is set."""

    def __init__(self, answers: list[tuple[int, list[int]]]) -> None:
        super().__init__()
        self.answers, self.asked, self.release = answers, 0, asyncio.Event()

    async def request(self, subject: str, msg: msgspec.Struct, timeout_s: float) -> Reply:  # type: ignore[override]
        self.asked += 1
        next_seq, hashes = self.answers[self.asked - 1]
        if self.asked == 1:
            await self.release.wait()
        nonce = decode(encode(msg), KVSnapshotRequest).nonce
        return Reply(encode(snapshot(next_seq, hashes, nonce=nonce)), None)


async def test_an_engine_that_lost_events_while_its_snapshot_was_asked_for_is_asked_again_after() -> None:
    feed = await joined(feed_with(None))
    fetcher = SnapshotFetcher(feed)
    fetcher.bus = bus = HeldBus([(3, [1]), (10, [1, 2])])
    fetcher.want("e1")
    await asyncio.sleep(0)  # the first ask is under way
    feed.on_kv(stored(3, 7))
    feed.on_kv(stored(9, 2))  # 4 to 8 lost: the index is cleared and the snapshot wanted again
    bus.release.set()  # the first answer, as of event 3, is older than event 9: not applied
    deadline = time.monotonic() + 10
    while not holds(feed, 1):
        assert time.monotonic() < deadline, f"not asked again ({bus.asked} asks)"
        await asyncio.sleep(0.01)
    assert bus.asked == 2 and holds(feed, 2)
    await fetcher.close()


async def test_after_a_jump_far_ahead_the_engines_snapshot_sets_the_numbering_back() -> None:
    feed = await joined(feed_with(None))
    feed.on_kv(stored(0, 1))
    feed.on_kv(stored((1 << 63) - 1))  # one message numbered far ahead (forged, or two engines under one id)
    snap = snapshot(5, [1, 2])
    assert feed.begin_snapshot(snap)  # the engine's own figures: accepted
    assert feed.snapshot_chunk(snap, 0, 16)
    feed.end_snapshot("e1")
    feed.on_kv(stored(5, 3))
    assert holds(feed, 1) and holds(feed, 2) and holds(feed, 3)
