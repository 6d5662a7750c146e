"""How often a subscriber of the engine's ZMQ KV events fell behind is on its /metrics: each time its queue was full
when a batch was sent (it misses batches until it catches up, and sees the gap in the sequence frame). The server as
assembled with its socket on an in-process endpoint, so a subscriber's queue holds exactly the two high-water marks
(1,000 at the publisher, its own) and is overflowed by publishing twice that while it reads nothing; /metrics read in
process."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from services.engine_server.server import ServerOptions, build
from services.engine_server.zmq_events import ZmqKVPublisher
from shared.core.kv_events import KVEventBatch

zmq = pytest.importorskip("zmq")

LABELS = '{engine="0",model_name="m"}'
NAME = "gantry:engine_zmq_kv_subscriber_overflows_total"
ENDPOINTS = (f"inproc://gantry-test-zmq-drops-{i}" for i in itertools.count())  # one per server: bound till closed
SLOW_RCVHWM = 10  # the slow subscriber's own queue: with the publisher's 1,000 it holds 1,010 batches
OVERFLOW = 2 * (1_000 + SLOW_RCVHWM)  # batches that overflow it (it is set aside at once, taken back late)


@pytest.fixture
async def app() -> AsyncIterator[FastAPI]:
    app, _ = build(ServerOptions(kv_events_zmq=next(ENDPOINTS), num_gpu_blocks=200, served_model_name="m",
                                 access_log=False))
    try:
        yield app
    finally:
        app.state.writer.close()
        app.state.zmq_publisher.close()


@pytest.fixture
def subscribers() -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for sock in made:
        sock.close(linger=0)


def _subscribe(made: list[Any], pub: ZmqKVPublisher, rcvhwm: int) -> Any:
    sock = zmq.Context.instance().socket(zmq.SUB)  # inproc: the publisher's context
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.connect(pub.endpoint)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    made.append(sock)
    return sock


def _read_all(sock: Any) -> list[int]:
    """Sequence numbers of every batch waiting at ``sock``."""
    seqs = []
    while True:
        try:
            seqs.append(int.from_bytes(sock.recv_multipart(flags=zmq.NOBLOCK)[1], "big"))
        except zmq.Again:
            return seqs


def _until_subscribed(pub: ZmqKVPublisher, subs: list[Any]) -> list[list[int]]:
    """Publish until every subscriber got a batch (its subscription reached the publisher); what each received."""
    got: list[list[int]] = [[] for _ in subs]
    deadline = time.monotonic() + 30  # a loaded host may take a while to pass the subscription on
    while not all(got):
        assert time.monotonic() < deadline, "a subscription never reached the publisher"
        pub.publish(KVEventBatch(ts=0.0, events=[]))
        for sock, seqs in zip(subs, got, strict=True):
            if sock.poll(20):
                seqs += _read_all(sock)
    return got


async def _metric_text(app: FastAPI) -> str:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        r = await client.get("/metrics")
    assert r.status_code == 200
    return r.text


async def _metric(app: FastAPI) -> float:
    line = next((ln for ln in (await _metric_text(app)).splitlines() if ln.startswith(NAME + LABELS + " ")), None)
    assert line is not None, f"{NAME} is not on /metrics"
    return float(line.rsplit(" ", 1)[1])


def _publish(pub: ZmqKVPublisher, n: int) -> None:
    for _ in range(n):
        pub.publish(KVEventBatch(ts=0.0, events=[]))


async def test_each_time_a_subscribers_queue_overflows_is_counted_on_metrics(
        app: FastAPI, subscribers: list[Any]) -> None:
    pub: ZmqKVPublisher = app.state.zmq_publisher
    slow = _subscribe(subscribers, pub, SLOW_RCVHWM)
    assert await _metric(app) == 0
    [got] = _until_subscribed(pub, [slow])
    _publish(pub, OVERFLOW)  # it reads nothing: its queue fills and overflows once
    got += _read_all(slow)  # it catches up
    assert len(got) < pub.seq - got[0]  # it missed batches (the next one it gets shows the gap)
    assert await _metric(app) == 1
    _publish(pub, OVERFLOW)  # and falls behind again
    assert await _metric(app) == 2


async def test_a_subscriber_with_room_gets_every_batch_while_another_ones_queue_is_full(
        app: FastAPI, subscribers: list[Any]) -> None:
    pub: ZmqKVPublisher = app.state.zmq_publisher
    slow, fast = _subscribe(subscribers, pub, SLOW_RCVHWM), _subscribe(subscribers, pub, 100_000)
    _, got = _until_subscribed(pub, [slow, fast])
    _publish(pub, OVERFLOW)
    got += _read_all(fast)
    assert await _metric(app) == 1  # the slow one overflowed
    assert got == list(range(got[0], pub.seq))  # the fast one missed nothing


async def test_the_zmq_overflow_counter_says_what_a_non_zero_value_means(app: FastAPI) -> None:
    helps = [ln for ln in (await _metric_text(app)).splitlines() if ln.startswith(f"# HELP {NAME} ")]
    assert len(helps) == 1 and "Non-zero" in helps[0]
