"""Engine failures shared between gateway replicas over a real nats-server, as each replica connects (the gateway
identity): a failure seen at one replica counts at the others, so three failures spread over three replicas leave
the engine out at all of them; a stranger's message on the subject is refused by the server, a malformed one is
dead-lettered, and a replayed one is dropped."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS

from ops.auth import ADMIN, ENGINE, GATEWAY, Credentials
from ops.servers import ServerProcess
from services.gateway.service import Gateway, GatewayOptions
from shared.bus import subjects
from shared.bus.connection import nats_options
from shared.bus.messages import EndpointOutcome, EndpointOutcomes, ErrorEvent
from shared.bus.runtime import Bus
from shared.core.routing import Endpoint
from shared.envsettings import EnvSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ENGINES = ("out-e0", "out-e1", "out-e2")


async def _until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def _connect(url: str) -> NATS:
    return await nats.connect(url, **nats_options(EnvSettings(nats_url=url)))


@contextlib.asynccontextmanager
async def _replicas(n: int, url: str, tmp: Path) -> AsyncIterator[list[Gateway]]:
    """``n`` gateway replicas' routers, each knowing the three engines, sharing outcomes as ``Gateway.run`` does."""
    gws: list[Gateway] = []
    conns: list[NATS] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for i in range(n):
            gw = Gateway(GatewayOptions(nats_url=url, eds_path=tmp / f"eds{i}.json"))
            gw.router.set_endpoints([Endpoint(e, "m", f"127.0.0.1:{9000 + k}") for k, e in enumerate(ENGINES)])
            nc = await _connect(url)
            conns.append(nc)
            gw.bus = Bus(nc, "gateway")
            await gw._take_outcomes(nc)
            await nc.flush()
            tasks.append(asyncio.create_task(gw.outcomes.send_forever(gw.bus)))
            gws.append(gw)
        yield gws
    finally:
        for t in tasks:
            t.cancel()
        for nc in conns:
            await nc.close()


def _fail(gw: Gateway, endpoint: str, tag: str) -> None:
    """One request of this replica failed at ``endpoint`` (an error answer)."""
    now = time.time()
    gw.router.state.dispatched(tag, endpoint, 10, now)
    gw.router.finished(tag, ok=False, now=now)


def test_one_failure_at_each_of_three_replicas_leaves_the_engine_out_at_all_three(
        nats_server: ServerProcess, credentials: Credentials, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _replicas(3, credentials.url(nats_server.url, GATEWAY), tmp_path) as gws:
            for i, gw in enumerate(gws):
                _fail(gw, "out-e0", f"r{i}")  # alone, none of them would count the engine broken
            await _until(lambda: all(gw.router.state.endpoints["out-e0"].broken(time.time()) for gw in gws))
            for gw in gws:
                pool = gw.router.state.pool("m")
                assert [st.id for st in gw.router.state.working(pool, time.time())] == ["out-e1", "out-e2"]
                assert gw.outcomes.applied == 2  # the two others' failures; its own not echoed back
    asyncio.run(scenario())


def test_a_success_after_failures_at_one_replica_brings_the_engine_back_at_the_others(
        nats_server: ServerProcess, credentials: Credentials, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _replicas(2, credentials.url(nats_server.url, GATEWAY), tmp_path) as (a, b):
            for k in range(3):
                _fail(a, "out-e1", f"f{k}")
            await _until(lambda: b.router.state.endpoints["out-e1"].broken(time.time()))
            a.router.state.dispatched("ok", "out-e1", 10, time.time())
            a.router.finished("ok", ok=True, now=time.time())
            await _until(lambda: not b.router.state.endpoints["out-e1"].failing(time.time()))
            assert not b.router.state.streaking
    asyncio.run(scenario())


def test_a_stranger_cannot_report_failures_and_malformed_or_replayed_reports_are_not_counted(
        nats_server: ServerProcess, credentials: Credentials, tmp_path: Path) -> None:
    gw_url = credentials.url(nats_server.url, GATEWAY)

    async def scenario() -> None:
        async with _replicas(1, gw_url, tmp_path) as (gw,):
            forged = msgspec.json.encode(EndpointOutcomes(replica="stranger-1", seq=0, outcomes=[
                EndpointOutcome(endpoint="out-e2", failed=True)] * 3))
            engine = await _connect(credentials.url(nats_server.url, ENGINE))  # an engine's identity may not
            errors: list[Exception] = []

            async def on_error(err: Exception) -> None:
                errors.append(err)

            engine._error_cb = on_error  # the server's permissions violation arrives here
            await engine.publish(subjects.GATEWAY_OUTCOMES, forged)
            await engine.flush()
            await _until(lambda: any("permissions violation" in str(e).lower() for e in errors))
            await engine.close()
            peer = await _connect(gw_url)  # another gateway replica: allowed
            admin = await _connect(credentials.url(nats_server.url, ADMIN))
            dead = await admin.subscribe(subjects.dead_letter("gateway"))
            await admin.flush()
            await peer.publish(subjects.GATEWAY_OUTCOMES, b'{"replica": "x", "seq": -1, "outcomes": "no"}')
            reason = msgspec.json.decode((await dead.next_msg(timeout=10)).data, type=ErrorEvent).reason
            assert "outcomes" in reason or "seq" in reason or "replica" in reason, reason
            one = msgspec.json.encode(EndpointOutcomes(replica="peer-0001", seq=7, outcomes=[
                EndpointOutcome(endpoint="out-e2", failed=True)]))
            for _ in range(3):  # the same message three times (a replay): one failure, not a broken engine
                await peer.publish(subjects.GATEWAY_OUTCOMES, one)
            await peer.flush()
            await _until(lambda: gw.outcomes.duplicates == 2)
            st = gw.router.state.endpoints["out-e2"]
            assert st.fail_streak == 1 and not st.broken(time.time())
            await peer.close()
            await admin.close()
    asyncio.run(scenario())
