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
            await nc.publish(subjects.SYNC, encode(SyncRequest()))
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
        await nc.publish(subjects.SYNC, encode(SyncRequest()))
        await nc.publish(subjects.SYNC, encode(SyncRequest(worker="late1")))  # e.g. an unknown heartbeat's ask
        await until(lambda: set(heard) >= set(fleet.workers), "every worker registering again")
        await stop()
    finally:
        await fleet.close()
        await nc.close()
