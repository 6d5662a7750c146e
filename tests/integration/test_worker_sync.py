"""On a real nats-server: workers answer sync requests by registering at most once per window, and a requester
that asks within a window still hears every worker register after its request (a restarted reconciler's rebuild)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import nats
import pytest
from nats.aio.msg import Msg

from ops.servers import ServerProcess
from services.workers.emulator import Fleet, FleetConfig
from shared.bus import subjects
from shared.bus.messages import SyncRequest, encode

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
WINDOW_S = 3.0  # long against delivering a flood (milliseconds), short for the suite


async def until(done: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def registrations(nc: nats.NATS, prefix: str, into: dict[str, list[float]]) -> Callable[[], Awaitable[None]]:
    async def keep(msg: Msg) -> None:
        worker = subjects.reporting_worker(msg.subject)
        if worker.startswith(prefix):
            into.setdefault(worker, []).append(time.monotonic())

    sub = await nc.subscribe(subjects.REGISTER, cb=keep)
    await nc.flush()
    return sub.unsubscribe


async def test_a_flood_of_sync_requests_costs_each_worker_one_registration_per_window(
    nats_server: ServerProcess
) -> None:
    nc = await nats.connect(nats_server.url)
    heard: dict[str, list[float]] = {}
    stop = await registrations(nc, "flood", heard)
    fleet = Fleet(FleetConfig(count=3, prefix="flood", gpus=1, sync_window_s=WINDOW_S), nc)
    try:
        await fleet.start()  # each worker registers once: its window starts
        for _ in range(200):
            await nc.publish(subjects.SYNC, encode(SyncRequest(by="test")))
        await nc.flush()
        flood_sent = time.monotonic()
        names = list(fleet.workers)
        # every worker answers the flood with one registration when its window closes, sent after the flood
        await until(lambda: all(len(heard.get(n, [])) >= 2 for n in names), "each worker's answer to the flood")
        assert {n: len(heard[n]) for n in names} == dict.fromkeys(names, 2)
        assert all(heard[n][1] > flood_sent for n in names)
    finally:
        await stop()
        await fleet.close()
        await nc.close()


async def test_a_requester_that_subscribed_after_the_workers_registered_still_hears_every_one(
    nats_server: ServerProcess
) -> None:
    nc = await nats.connect(nats_server.url)
    fleet = Fleet(FleetConfig(count=3, prefix="late", gpus=1, sync_window_s=WINDOW_S), nc)
    heard: dict[str, list[float]] = {}
    try:
        await fleet.start()  # registered before anyone below listened, so inside every worker's window
        stop = await registrations(nc, "late", heard)  # as a restarted reconciler: subscribe, then ask all
        await nc.publish(subjects.SYNC, encode(SyncRequest(by="test")))
        await nc.publish(subjects.SYNC, encode(SyncRequest(by="test", worker="late1")))  # an unknown heartbeat
        await until(lambda: set(heard) >= set(fleet.workers), "every worker registering again")
        await stop()
    finally:
        await fleet.close()
        await nc.close()


async def test_what_the_server_publishes_on_a_chosen_subject_never_reads_as_a_sync(
    nats_server: ServerProcess
) -> None:
    # only the reconciler (and the admin) may publish on gantry.worker.sync; but a JetStream publish acknowledgement
    # goes to whatever reply subject the publisher names, and a consumer delivers wherever its creator says
    import json

    from ops.auth import Credentials
    from shared.bus import streams
    from shared.bus.messages import UnschedulableEvent
    from shared.settings import Settings

    admin = await nats.connect(nats_server.url)
    creds = nats_server.credentials
    assert isinstance(creds, Credentials)
    await streams.ensure_streams(admin.jetstream(), Settings())
    await admin.jetstream().publish(subjects.EVENT_UNSCHEDULABLE,
                                    encode(UnschedulableEvent(instance_id="x-1", model="x", message="no", at=1.0)))
    fleet = Fleet(FleetConfig(count=3, prefix="forge", gpus=1, sync_window_s=0.1), admin)
    heard: dict[str, list[float]] = {}
    try:
        await fleet.start()
        await asyncio.sleep(0.3)  # past every worker's window: a real ask now is answered at once
        stop = await registrations(admin, "forge", heard)
        worker = await nats.connect(creds.url(nats_server.url, "worker-w1"), inbox_prefix="_INBOX.worker-w1")
        await worker.publish(subjects.instance_status("w1"), b'{"reports": []}', reply=subjects.SYNC)
        cli = await nats.connect(creds.url(nats_server.url, "cli"), inbox_prefix="_INBOX.cli")
        config = {"deliver_subject": subjects.SYNC, "ack_policy": "none",
                  "filter_subject": subjects.EVENT_UNSCHEDULABLE}
        made = await cli.request(f"$JS.API.CONSUMER.CREATE.{streams.STREAM_EVENTS}",  # an ephemeral one, as it may
                                 json.dumps({"stream_name": streams.STREAM_EVENTS, "config": config}).encode(), 5)
        assert "error" not in json.loads(made.data)
        await asyncio.sleep(1.0)
        assert heard == {}  # neither the ack nor the delivered event made a worker register
        await admin.publish(subjects.SYNC, encode(SyncRequest(by="test")))  # a real ask still works
        await until(lambda: set(heard) >= set(fleet.workers), "every worker registering again")
        await stop()
        await worker.close()
        await cli.close()
    finally:
        await fleet.close()
        await admin.close()
