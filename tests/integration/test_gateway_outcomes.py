"""Engine failures shared between gateway replicas over a real nats-server, as each replica connects (the gateway
identity): a failure seen at one replica counts at the others, so three failures spread over three replicas leave
the engine out at all of them; a stranger's message on the subject is refused by the server, a malformed one is
dead-lettered (once: not again when a consumer delivers the dead letter back), and a replayed one is dropped."""

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
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ops.auth import ADMIN, CLI, ENGINE, GATEWAY, Credentials
from ops.servers import ServerProcess, free_port, start_nats
from services.gateway.service import Gateway, GatewayOptions
from shared.bus import subjects
from shared.bus.connection import inbox_prefix, nats_options
from shared.bus.messages import EndpointOutcome, EndpointOutcomes, ErrorEvent
from shared.bus.runtime import Bus
from shared.bus.streams import STREAM_DLQ, ensure_streams
from shared.core.routing import Endpoint
from shared.core.routing.domain import FAILED_HOLD_S
from shared.envsettings import EnvSettings
from shared.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ENGINES = ("out-e0", "out-e1", "out-e2")


async def _until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def _connect(url: str) -> NATS:
    return await nats.connect(url, **nats_options(EnvSettings(nats_url=url)))


class _Replicas(list[Gateway]):
    """Gateway replicas' routers, each knowing the three engines, sharing outcomes as ``Gateway.run`` does."""

    def __init__(self, url: str, tmp: Path) -> None:
        super().__init__()
        self.url, self.tmp = url, tmp
        self.conns: list[NATS] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self, **connect: float) -> Gateway:
        """One more replica (``connect``: nats-py reconnection settings)."""
        gw = Gateway(GatewayOptions(nats_url=self.url, eds_path=self.tmp / f"eds{len(self)}.json"))
        gw.router.set_endpoints([Endpoint(e, "m", f"127.0.0.1:{9000 + k}") for k, e in enumerate(ENGINES)])
        nc = await nats.connect(self.url, max_reconnect_attempts=-1, **connect,  # type: ignore[arg-type]
                                **nats_options(EnvSettings(nats_url=self.url)))
        self.conns.append(nc)
        gw.bus = Bus(nc, "gateway")
        await gw._take_outcomes(nc)
        await nc.flush()
        self.tasks.append(asyncio.create_task(gw.outcomes.send_forever(gw.bus)))
        self.append(gw)
        return gw


@contextlib.asynccontextmanager
async def _replicas(n: int, url: str, tmp: Path) -> AsyncIterator[_Replicas]:
    """``n`` replicas (more can be started), stopped on exit."""
    out = _Replicas(url, tmp)
    try:
        for _ in range(n):
            await out.start()
        yield out
    finally:
        for t in out.tasks:
            t.cancel()
        for nc in out.conns:
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
            forged = msgspec.json.encode(EndpointOutcomes(replica="stranger-1", seq=0, sent_at=time.time(), outcomes=[
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
            one = msgspec.json.encode(EndpointOutcomes(replica="peer-0001", seq=7, sent_at=time.time(), outcomes=[
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


def test_a_replica_started_after_an_engine_broke_leaves_it_out_without_failures_of_its_own(
        nats_server: ServerProcess, credentials: Credentials, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with _replicas(2, credentials.url(nats_server.url, GATEWAY), tmp_path) as gws:
            a, b = gws
            for k in range(3):
                _fail(a, "out-e1", f"f{k}")
            await _until(lambda: b.router.state.endpoints["out-e1"].broken(time.time()))
            late = await gws.start()  # nobody routes to out-e1 any more: only the others' digests can tell it
            await _until(lambda: late.router.state.endpoints["out-e1"].broken(time.time()), timeout=5)
            assert late.router.state.endpoints["out-e1"].failed_at == pytest.approx(
                a.router.state.endpoints["out-e1"].failed_at, abs=0.2)  # dated as the failures are: no new hold
    asyncio.run(scenario())


def test_failures_seen_while_nats_was_away_do_not_start_a_new_hold_at_the_peers(tmp_path: Path) -> None:
    # nats-py buffers what a disconnected client publishes and delivers it on reconnect; dated on arrival, those
    # failures used to keep a recovered engine out at every peer for another 10 s
    creds = Credentials.generate()
    port = free_port()
    first = start_nats(tmp_path / "n1", port=port, auth=creds)
    url = creds.url(f"nats://127.0.0.1:{port}", GATEWAY)

    async def scenario() -> None:
        async with _replicas(0, url, tmp_path) as gws:
            a = await gws.start(reconnect_time_wait=1.0)
            b = await gws.start(reconnect_time_wait=0.2)  # back first, so it hears whatever a flushes
            first.stop()
            await asyncio.sleep(0.3)
            t0 = time.time()
            for k in range(3):
                _fail(a, "out-e0", f"f{k}")
            await asyncio.sleep(2.5)
            second = start_nats(tmp_path / "n2", port=port, auth=creds)
            try:
                await _until(lambda: all(nc.is_connected for nc in gws.conns), timeout=15)
                await _until(lambda: b.router.state.endpoints["out-e0"].broken(time.time()), timeout=5)  # a's digest
                st = b.router.state.endpoints["out-e0"]
                assert st.failed_at is not None and st.failed_at <= t0 + 0.5, st.failed_at - t0
                assert not st.broken(t0 + FAILED_HOLD_S + 0.5)  # out at b exactly as long as at a
            finally:
                second.stop()
    asyncio.run(scenario())


def test_dead_letters_delivered_back_onto_the_subject_are_not_dead_lettered_again(tmp_path: Path) -> None:
    # NATS does not check a push consumer's delivery subject against its creator's rights, so the operator CLI's
    # replay right can point the dead-letter stream at the outcome subject. Each replica rejects what is delivered
    # there; dead-lettering it again would be stored and delivered again, three more at every turn.
    creds = Credentials.generate()
    server = start_nats(tmp_path / "n", auth=creds)

    async def scenario() -> None:
        admin = await _connect(creds.url(server.url, ADMIN))
        await ensure_streams(admin.jetstream(), Settings(nats_url=server.url))

        async def stored() -> int:
            return (await admin.jetstream().stream_info(STREAM_DLQ)).state.messages

        async with _replicas(3, creds.url(server.url, GATEWAY), tmp_path) as gws:
            cli = await nats.connect(creds.url(server.url, CLI), inbox_prefix=inbox_prefix(CLI))
            await cli.jetstream().add_consumer(STREAM_DLQ, ConsumerConfig(
                deliver_subject=subjects.GATEWAY_OUTCOMES, deliver_policy=DeliverPolicy.NEW, ack_policy=AckPolicy.NONE))
            peer = await _connect(creds.url(server.url, GATEWAY))
            await peer.publish(subjects.GATEWAY_OUTCOMES, b'{"replica": "x", "seq": -1}')  # one malformed message
            await peer.flush()
            deadline = time.monotonic() + 10
            while await stored() < 3 and time.monotonic() < deadline:  # one dead letter from each replica
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.5)  # a loop goes round in milliseconds
            assert await stored() == 3
            assert [gw.outcomes.applied for gw in gws] == [0, 0, 0]
            await peer.close()
            await cli.close()
        await admin.close()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
