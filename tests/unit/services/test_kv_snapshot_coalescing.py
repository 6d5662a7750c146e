"""An engine answers a flood of prefix-cache snapshot requests from one build per window (while its cache stays as
it was), a bounded number per window, and every requester still gets an answer bound to its own request that its
picker verifies (each answer signed on its own: a reused build is not a replayed message). The engine server's real
publisher on the session's real NATS."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator

import nats
import pytest

from ops.servers import ServerProcess
from services.engine_server.publisher import SNAPSHOT_ANSWERS, Publisher, SnapshotAnswer
from services.engine_server.runner import CollectSink, EngineRunner
from shared.bus import subjects
from shared.bus.messages import EngineKVSnapshot, KVSnapshotRequest, decode, encode
from shared.core.engine import CalibratedStepTime, Engine, Request, SchedulerConfig
from shared.core.kv_events import KVEventBatch
from shared.host.report_auth import ACCEPTED, SIGNATURE_HEADER, SNAPSHOT, ReportVerifier, derive_key

MASTER = b"m" * 32
WINDOW_S = 0.2


async def cached_engine() -> tuple[Engine, EngineRunner]:
    engine = Engine(SchedulerConfig(num_gpu_blocks=100, enable_kv_events=True),
                    CalibratedStepTime(base_s=0.01, per_token_s=1e-5), fast_forward=False)
    runner = EngineRunner(engine, speedup=50.0)
    runner.start()
    sink = CollectSink()
    runner.submit(Request("r0", list(range(64)), max_tokens=2, ignore_eos=True), sink)
    await asyncio.wait_for(sink.done, 10)
    await runner.stop()  # the cache stays as it is from here on
    return engine, runner


@pytest.fixture
async def publisher(nats_server: ServerProcess) -> AsyncIterator[Publisher]:
    engine, runner = await cached_engine()
    instance = f"coalesce-{secrets.token_hex(4)}"
    pub = Publisher(runner, nats_server.url, instance, "m", "http://127.0.0.1:1", interval_s=5.0,
                    report_key=derive_key(MASTER, instance), snapshot_window_s=WINDOW_S)

    def fan_out() -> None:
        batch = engine.take_kv_events()
        if batch is not None:
            pub.queue_kv(batch)

    pub.flush_kv, pub.serve_snapshots = fan_out, True
    task = asyncio.create_task(pub.run())
    yield pub
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_flood_of_requests_costs_one_build_and_every_requester_gets_its_own_verified_snapshot(
    publisher: Publisher, nats_server: ServerProcess
) -> None:
    nc = await nats.connect(nats_server.url)
    subject = subjects.engine_kv_snapshot(publisher.instance_id)
    n = 3 * SNAPSHOT_ANSWERS + 1  # four windows' worth
    nonces = [secrets.token_hex(16) for _ in range(n)]
    try:
        # the first request waits for the engine to subscribe (a slow host); the flood follows at once
        deadline = time.monotonic() + 30
        while True:
            try:
                first = await nc.request(subject, encode(KVSnapshotRequest(nonce=nonces[0])), timeout=2)
                break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                assert time.monotonic() < deadline, "the engine never answered"
                await asyncio.sleep(0.1)
        rest = await asyncio.gather(*(nc.request(subject, encode(KVSnapshotRequest(nonce=nonce)), timeout=30)
                                      for nonce in nonces[1:]))
    finally:
        await nc.close()
    replies = [first, *rest]
    snaps = [decode(r.data, EngineKVSnapshot) for r in replies]
    assert [s.nonce for s in snaps] == nonces  # each answer bound to its own request
    assert len({tuple(s.block_hashes) for s in snaps}) == 1 and snaps[0].block_hashes  # one cache, as it is
    assert publisher.snapshot_builds == 1  # the cache never changed: one build served every window
    for reply in replies:  # as many pickers, each verifying the answer it got
        assert ReportVerifier(MASTER).check(publisher.instance_id, reply.data, reply.headers, SNAPSHOT) == ACCEPTED
    # one picker asking again later (a gap in its KV numbering) accepts the reused build's answer: a newer stamp
    picker = ReportVerifier(MASTER)
    stamps = sorted(replies, key=lambda r: int((r.headers or {})[SIGNATURE_HEADER].split(".")[1]))
    assert [picker.check(publisher.instance_id, r.data, r.headers, SNAPSHOT) for r in stamps] == [ACCEPTED] * n


async def test_a_cache_change_makes_the_next_answer_a_new_build() -> None:
    _, runner = await cached_engine()
    pub = Publisher(runner, "nats://127.0.0.1:1", "e1", "m", "http://127.0.0.1:1")
    before = pub.snapshot_build()
    assert pub.snapshot_build() is before and pub.snapshot_builds == 1
    pub.queue_kv(KVEventBatch(ts=0.0, events=[]))  # a step changed the cache: a KV message is queued
    after = pub.snapshot_build()
    assert after is not before and after.next_seq == before.next_seq + 1 and pub.snapshot_builds == 2


async def test_every_answer_of_a_build_is_the_json_of_the_snapshot_it_stands_for() -> None:
    _, runner = await cached_engine()
    pub = Publisher(runner, "nats://127.0.0.1:1", "e1", "m", "http://127.0.0.1:1")
    built = pub.snapshot_build()
    nonces = ("a" * 32, "b" * 32, "c" * 32)  # the first answer encodes the list, the others its JSON kept once
    answers = [pub.snapshot_answer(built, nonce) for nonce in nonces]
    assert [decode(a, EngineKVSnapshot) for a in answers] == [pub.kv_snapshot(n) for n in nonces]
    assert SnapshotAnswer.__struct_fields__ == EngineKVSnapshot.__struct_fields__


async def test_a_failed_build_drops_its_requests_and_the_engine_answers_the_next_one(
    publisher: Publisher, nats_server: ServerProcess
) -> None:
    real, calls = publisher.snapshot_build, []

    def breaks_once() -> object:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a build that fails")
        return real()

    publisher.snapshot_build = breaks_once  # type: ignore[method-assign,assignment]
    nc = await nats.connect(nats_server.url)
    subject = subjects.engine_kv_snapshot(publisher.instance_id)
    try:
        deadline = time.monotonic() + 30  # the first answered request comes after the failed build
        while True:
            try:
                reply = await nc.request(subject, encode(KVSnapshotRequest(nonce="n" * 32)), timeout=2)
                break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                assert time.monotonic() < deadline, f"no answer after the failed build ({len(calls)} builds)"
                await asyncio.sleep(0.1)
    finally:
        await nc.close()
    assert len(calls) >= 2 and decode(reply.data, EngineKVSnapshot).nonce == "n" * 32
