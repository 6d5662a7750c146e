"""What the engine's NATS publisher drops is on its /metrics: KV-event batches dropped for a full backlog (a router's
prefix index of this engine then misses them) and prefix-cache snapshot requests dropped for a full queue (their
requester times out). The server as assembled, its /metrics read in process; the publisher is not connected, so
nothing it queues leaves and each drop is reached by queueing one past its bound."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
from fastapi import FastAPI

from services.engine_server.publisher import MAX_KV_BACKLOG, MAX_SNAPSHOT_WAITING, Publisher
from services.engine_server.server import ServerOptions, build
from shared.bus.messages import EngineMetrics, Message, decode, encode
from shared.core.kv_events import KVEventBatch

LABELS = '{engine="0",model_name="m"}'


@pytest.fixture
async def app() -> AsyncIterator[FastAPI]:
    app, _ = build(ServerOptions(nats_url="nats://127.0.0.1:1", num_gpu_blocks=200, served_model_name="m",
                                 access_log=False))
    try:
        yield app
    finally:
        app.state.writer.close()


def _publisher(app: FastAPI) -> Publisher:
    pub = app.state.publisher
    assert isinstance(pub, Publisher)
    return pub


async def _metric(app: FastAPI, name: str) -> float:
    """The value of one sample of the server's /metrics text."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        r = await client.get("/metrics")
    assert r.status_code == 200
    line = next((ln for ln in r.text.splitlines() if ln.startswith(name + LABELS + " ")), None)
    assert line is not None, f"{name} is not on /metrics"
    return float(line.rsplit(" ", 1)[1])


async def test_kv_event_batches_dropped_for_a_full_backlog_are_counted_on_metrics(app: FastAPI) -> None:
    pub = _publisher(app)
    assert await _metric(app, "gantry:engine_kv_events_dropped_total") == 0
    for _ in range(MAX_KV_BACKLOG + 3):  # NATS unreachable: the backlog fills, then the oldest batches go
        pub.queue_kv(KVEventBatch(ts=0.0, events=[]))
    assert await _metric(app, "gantry:engine_kv_events_dropped_total") == 3


async def test_snapshot_requests_dropped_for_a_full_queue_are_counted_on_metrics(app: FastAPI) -> None:
    pub = _publisher(app)
    assert await _metric(app, "gantry:engine_kv_snapshot_requests_dropped_total") == 0
    taken = [pub.ask_snapshot(f"_INBOX.{i}", "n" * 32) for i in range(MAX_SNAPSHOT_WAITING + 2)]
    assert taken.count(False) == 2  # none answered yet: the queue holds MAX_SNAPSHOT_WAITING
    assert await _metric(app, "gantry:engine_kv_snapshot_requests_dropped_total") == 2


async def test_the_drop_counters_say_what_a_non_zero_value_means(app: FastAPI) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        text = (await client.get("/metrics")).text
    helps = {ln.split(" ")[2]: ln for ln in text.splitlines() if ln.startswith("# HELP gantry:engine_kv_")}
    assert "Non-zero" in helps["gantry:engine_kv_events_dropped_total"]
    assert "Non-zero" in helps["gantry:engine_kv_snapshot_requests_dropped_total"]


DROP_FIELDS = {"kv_events_dropped", "kv_snapshot_requests_dropped"}


def _as_an_older_reader(data: bytes) -> Any:
    """``data`` decoded by a reader built before the drop counters joined EngineMetrics: the same declaration
    without those fields."""
    fields: list[Any] = []
    for f in msgspec.structs.fields(EngineMetrics):
        if f.name in DROP_FIELDS:
            continue
        if f.default is not msgspec.NODEFAULT:
            fields.append((f.name, f.type, f.default))
        elif f.default_factory is not msgspec.NODEFAULT:
            fields.append((f.name, f.type, msgspec.field(default_factory=f.default_factory)))
        else:
            fields.append((f.name, f.type))
    older = msgspec.defstruct("EngineMetrics", fields, bases=(Message,), kw_only=True, frozen=True)
    return decode(data, older)


async def test_the_pushed_report_carries_what_the_publisher_dropped(app: FastAPI) -> None:
    pub = _publisher(app)
    for _ in range(MAX_KV_BACKLOG + 3):
        pub.queue_kv(KVEventBatch(ts=0.0, events=[]))
    for i in range(MAX_SNAPSHOT_WAITING + 2):
        pub.ask_snapshot(f"_INBOX.{i}", "n" * 32)
    report = decode(encode(pub.report()), EngineMetrics)  # as a picker reads it off the bus
    assert (report.kv_events_dropped, report.kv_snapshot_requests_dropped) == (3, 2)


def test_a_report_from_a_server_without_the_drop_counters_reads_as_nothing_dropped(app: FastAPI) -> None:
    sent = msgspec.json.decode(encode(_publisher(app).report()))
    for name in DROP_FIELDS:
        del sent[name]
    report = decode(msgspec.json.encode(sent), EngineMetrics)
    assert (report.kv_events_dropped, report.kv_snapshot_requests_dropped) == (0, 0)


def test_a_reader_without_the_drop_counters_still_reads_a_report_that_has_them(app: FastAPI) -> None:
    pub = _publisher(app)
    for _ in range(MAX_KV_BACKLOG + 1):
        pub.queue_kv(KVEventBatch(ts=0.0, events=[]))
    report = pub.report()
    assert report.kv_events_dropped == 1
    older = _as_an_older_reader(encode(report))
    assert not DROP_FIELDS & set(older.__struct_fields__)
    assert older.instance_id == report.instance_id and older.num_gpu_blocks == report.num_gpu_blocks
