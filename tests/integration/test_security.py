"""Authentication and least privilege on the real servers (issue 13): who may connect, publish, subscribe,
purge and write, with the identities and rights of ``ops.auth`` that every stack runs with."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable

import nats
import nats.errors
import nats.js.errors
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from nats.aio.client import Client
from nats.aio.msg import Msg

from ops.auth import ADMIN, ROLES, Credentials, without_userinfo
from ops.servers import ServerProcess
from shared.bus import subjects

pytestmark = pytest.mark.asyncio
REFUSED = r"permission|authenticat|NOAUTH|invalid username-password"  # Redis's refusals, never a success
CONNECT_S = 10  # a connection's handshake on a loaded host (a refusal comes back as soon as the server reads it)


async def eventually(cond: Callable[[], bool], what: str, state: Callable[[], object] = str,
                     timeout: float = 15) -> None:
    """Until ``cond`` holds. The server's permission errors (and deliveries) reach the client asynchronously: on a
    loaded host later than any fixed wait; a refusal that never comes still fails, after ``timeout``, saying
    ``state()`` (what did arrive)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"not seen in {timeout} s: {what} (seen: {state()})"
        await asyncio.sleep(0.05)


class Session:
    """A connection as one identity, recording the permission errors the server sends it."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: Client | None = None

    async def connect(self, url: str) -> Client:
        async def on_error(err: Exception) -> None:
            self.errors.append(str(err))

        self.nc = await nats.connect(url, error_cb=on_error, allow_reconnect=False, connect_timeout=CONNECT_S)
        return self.nc

    def violated(self, subject: str) -> bool:
        return any("permissions violation" in e.lower() and subject in e for e in self.errors)


@pytest.fixture
async def admin(nats_server: ServerProcess) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()


async def as_identity(server: ServerProcess, credentials: Credentials, identity: str) -> Session:
    session = Session()
    await session.connect(credentials.url(server.url, identity))
    return session


async def received(
    admin: Client, subject: str, publish: Client, publish_subject: str, expect: int = 0
) -> list[Msg]:
    """What ``admin`` (allowed everything) sees on ``subject`` while ``publish`` sends to ``publish_subject``.

    With ``expect`` = 0 (a refusal), one message is sent and 0.3 s waited for it. Otherwise the message is
    sent again every 0.5 s, up to 10 s, until ``expect`` arrive: core NATS delivers at most once, and on a
    starved CI host a single message once went missing; a denied publish never arrives however often it is
    sent, so the retries cannot turn a refusal into a pass."""
    got: list[Msg] = []

    async def keep(msg: Msg) -> None:
        got.append(msg)

    sub = await admin.subscribe(subject, cb=keep)
    await admin.flush()
    attempts = 1 if expect == 0 else 20
    for _ in range(attempts):
        await publish.publish(publish_subject, b"{}")
        await publish.flush()
        for _ in range(3 if expect == 0 else 5):
            await asyncio.sleep(0.1)
            if expect and len(got) >= expect:
                break
        if expect and len(got) >= expect:
            break
    await admin.flush()
    await sub.unsubscribe()
    return got[:expect] if expect else got


async def test_an_anonymous_client_cannot_connect_to_nats(nats_server: ServerProcess) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(without_userinfo(nats_server.url), allow_reconnect=False, connect_timeout=CONNECT_S)


async def test_a_wrong_secret_cannot_connect_to_nats(nats_server: ServerProcess, credentials: Credentials) -> None:
    forged = nats_server.url.replace(credentials.password("admin"), "guessed")
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(forged, allow_reconnect=False, connect_timeout=CONNECT_S)


@pytest.mark.parametrize(
    "subject",
    [subjects.SCALE, subjects.CORDON, subjects.worker_heartbeat("w2"), subjects.worker_register("w2"),
     subjects.worker_files("w2"), subjects.instance_status("w2"), subjects.worker_assign("w1"),
     subjects.PLACEMENT_SCORED],
)
async def test_a_worker_cannot_publish_commands_or_speak_for_another_worker(
    nats_server: ServerProcess, credentials: Credentials, admin: Client, subject: str
) -> None:
    worker = await as_identity(nats_server, credentials, "worker-w1")
    assert worker.nc is not None
    try:
        assert await received(admin, subject, worker.nc, subject) == []
        await eventually(lambda: worker.violated(subject), f"the violation of {subject}", lambda: worker.errors)
    finally:
        await worker.nc.close()


@pytest.mark.parametrize(
    "subject", [subjects.worker_heartbeat("w1"), subjects.worker_register("w1"), subjects.instance_status("w1")]
)
async def test_a_worker_publishes_its_own_reports(
    nats_server: ServerProcess, credentials: Credentials, admin: Client, subject: str
) -> None:
    worker = await as_identity(nats_server, credentials, "worker-w1")
    assert worker.nc is not None
    try:
        assert len(await received(admin, subject, worker.nc, subject, expect=1)) == 1
        assert worker.errors == []
    finally:
        await worker.nc.close()


# Every identity of the stack but the admin and the state writer (the reconciler), and a worker agent.
NOT_THE_WRITER = [r for r in ROLES if r not in (ADMIN, "reconciler")] + ["worker-w1"]


@pytest.mark.parametrize("identity", NOT_THE_WRITER)
async def test_no_identity_but_the_state_writer_may_ask_every_worker_to_register(
    nats_server: ServerProcess, credentials: Credentials, admin: Client, identity: str
) -> None:
    asker = await as_identity(nats_server, credentials, identity)
    assert asker.nc is not None
    try:
        assert await received(admin, subjects.SYNC, asker.nc, subjects.SYNC) == []
        assert asker.violated(subjects.SYNC)
    finally:
        await asker.nc.close()


async def test_the_state_writer_asks_the_workers_to_register(
    nats_server: ServerProcess, credentials: Credentials, admin: Client
) -> None:
    writer = await as_identity(nats_server, credentials, "reconciler")
    assert writer.nc is not None
    try:
        assert len(await received(admin, subjects.SYNC, writer.nc, subjects.SYNC, expect=1)) == 1
        assert writer.errors == []
    finally:
        await writer.nc.close()


async def test_a_worker_cannot_read_another_workers_assignments(
    nats_server: ServerProcess, credentials: Credentials, admin: Client
) -> None:
    worker = await as_identity(nats_server, credentials, "worker-w1")
    assert worker.nc is not None
    got: list[Msg] = []

    async def keep(msg: Msg) -> None:
        got.append(msg)

    try:
        for subject in (subjects.worker_assign("w2"), subjects.worker_assign("*"), "gantry.agent.>", ">"):
            await worker.nc.subscribe(subject, cb=keep)
        await worker.nc.flush()
        await eventually(lambda: worker.violated(subjects.worker_assign("w2")), "the refused subscription",
                         lambda: worker.errors)
        await admin.publish(subjects.worker_assign("w2"), b"{}")
        await admin.flush()
        await asyncio.sleep(0.3)
        assert got == []
        # Its own assignments do arrive (and only they: a late one of w2's would show here too).
        await worker.nc.subscribe(subjects.worker_assign("w1"), cb=keep)
        await worker.nc.flush()
        await admin.publish(subjects.worker_assign("w1"), b"{}")
        await admin.flush()
        await eventually(lambda: bool(got), "w1's own assignment", lambda: worker.errors)
        assert [m.subject for m in got] == [subjects.worker_assign("w1")]
    finally:
        await worker.nc.close()


@pytest.mark.parametrize("identity", ["filter", "fitting", "scoring", "reconciler", "cli", "workers",
                                      "engine_server", "worker-w0"])
async def test_no_identity_but_the_admin_can_purge_or_delete_a_stream(
    nats_server: ServerProcess, credentials: Credentials, admin: Client, identity: str
) -> None:
    stream = f"SEC_{uuid.uuid4().hex[:8].upper()}"
    js = admin.jetstream()
    await js.add_stream(name=stream, subjects=[f"sec.{stream}.>"])
    await js.publish(f"sec.{stream}.x", b"kept")
    session = await as_identity(nats_server, credentials, identity)
    assert session.nc is not None
    try:
        apis = (f"$JS.API.STREAM.PURGE.{stream}", f"$JS.API.STREAM.DELETE.{stream}")
        # refused by the server: no reply ever comes (both asked at once, one 0.5 s wait for the two)
        replies = await asyncio.gather(*(session.nc.request(api, b"", timeout=0.5) for api in apis),
                                       return_exceptions=True)
        assert all(isinstance(r, nats.errors.Error) for r in replies), replies
        assert (await js.stream_info(stream)).state.messages == 1
    finally:
        await session.nc.close()
        await js.delete_stream(stream)  # the admin may


def redis_as(server: ServerProcess, credentials: Credentials | None, identity: str = "") -> aioredis.Redis:
    url = credentials.url(server.url, identity) if credentials else without_userinfo(server.url)
    return aioredis.from_url(url)


@pytest.mark.parametrize("identity", ["", "filter", "fitting", "scoring", "cli", "workers", "worker-w0"])
async def test_only_the_writer_can_write_the_ledger_capacity(
    redis_server: ServerProcess, credentials: Credentials, identity: str
) -> None:
    client = redis_as(redis_server, credentials if identity else None, identity)
    try:
        with pytest.raises(redis.exceptions.RedisError, match=REFUSED):
            await client.hset("gantry:gpu:cap", "w0:0", str(1 << 50))
    finally:
        await client.aclose()


@pytest.mark.parametrize("identity", ["", "filter", "reconciler", "cli"])
@pytest.mark.parametrize("command", [("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "SET", "dir", "/tmp"),
                                     ("DEBUG", "SLEEP", "0"), ("SCRIPT", "FLUSH"), ("KEYS", "*")])
async def test_nobody_but_the_admin_flushes_configures_or_debugs_redis(
    redis_server: ServerProcess, credentials: Credentials, identity: str, command: tuple[str, ...]
) -> None:
    client = redis_as(redis_server, credentials if identity else None, identity)
    try:
        with pytest.raises(redis.exceptions.RedisError, match=REFUSED):
            await client.execute_command(*command)  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()


async def test_the_reconciler_writes_and_a_reader_reads_gantry_keys_only(
    redis_server: ServerProcess, credentials: Credentials
) -> None:
    writer, reader = redis_as(redis_server, credentials, "reconciler"), redis_as(redis_server, credentials, "filter")
    key = f"gantry:sec:{uuid.uuid4().hex}"
    try:
        await writer.hset(key, "a", "1")
        assert await reader.hget(key, "a") == b"1"
        with pytest.raises(redis.exceptions.NoPermissionError):
            await writer.set("not-gantry", "1")
    finally:
        admin = aioredis.from_url(redis_server.url)
        await admin.delete(key)
        await admin.aclose()
        await writer.aclose()
        await reader.aclose()


@pytest.mark.parametrize("identity", ["gateway", "picker"])
async def test_the_pickers_read_the_instances_and_nothing_else_of_the_store(
    redis_server: ServerProcess, credentials: Credentials, identity: str
) -> None:
    from shared.state.store import StateStore

    store = StateStore.from_url(credentials.url(redis_server.url, identity))
    client = redis_as(redis_server, credentials, identity)
    try:
        assert isinstance(await store.instances(), list)  # what its pool from placement reads
        with pytest.raises(redis.exceptions.NoPermissionError):
            await client.hgetall("gantry:gpu:cap")  # the ledger, the workers, the requests: not its business
        with pytest.raises(redis.exceptions.NoPermissionError):
            await client.hset("gantry:inst:state", "x", "RUNNING")
        for keyless in (("SCAN", "0"), ("RANDOMKEY",), ("DBSIZE",)):  # they list the key names of the whole store
            with pytest.raises(redis.exceptions.NoPermissionError):
                await client.execute_command(*keyless)
    finally:
        await store.close()
        await client.aclose()


async def test_the_cli_cannot_acknowledge_a_message_a_service_pulled(
    nats_server: ServerProcess, credentials: Credentials, admin: Client
) -> None:
    # The server takes an ack from whoever publishes on the ack subject: the CLI must not be let publish there.
    stream = f"SEC_{uuid.uuid4().hex[:8].upper()}"
    js = admin.jetstream()
    await js.add_stream(name=stream, subjects=[f"sec.{stream}.>"])
    await js.publish(f"sec.{stream}.x", b"work")
    sub = await js.pull_subscribe(f"sec.{stream}.x", durable="svc", stream=stream)
    [msg] = await sub.fetch(1, timeout=5)
    cli = await as_identity(nats_server, credentials, "cli")
    assert cli.nc is not None
    try:
        await cli.nc.publish(msg.reply, b"+ACK")
        await cli.nc.flush()
        # the server's refusal comes back asynchronously (nats-py reports the subject in lower case)
        await eventually(lambda: cli.violated(msg.reply.lower()), "the refused acknowledgement", lambda: cli.errors)
        assert (await js.consumer_info(stream, "svc")).num_ack_pending == 1
    finally:
        await cli.nc.close()
        await js.delete_stream(stream)


async def test_one_worker_flooding_its_status_subject_fills_only_the_status_stream(
        nats_server: ServerProcess, credentials: Credentials) -> None:
    import nats.js.errors

    from shared.bus import streams
    from shared.bus.runtime import js_publish, prepare
    from shared.settings import Settings

    admin = await nats.connect(nats_server.url)
    js = admin.jetstream()
    await streams.delete_streams(js)
    await prepare(admin, Settings(js_storage="memory"), streams.ALL_CONSUMERS)  # the reconciler's consumer: kept
    worker = await nats.connect(credentials.url(nats_server.url, "worker-w1"), inbox_prefix="_INBOX.worker-w1")
    cli = await nats.connect(credentials.url(nats_server.url, "cli"), inbox_prefix="_INBOX.cli")
    try:
        with pytest.raises(nats.js.errors.APIError, match="message size exceeds maximum"):
            await js_publish(worker, subjects.instance_status("w1"), b"x" * (streams.STATUS_MAX_MSG_BYTES + 1), "big")
        blob = b"x" * (streams.STATUS_MAX_MSG_BYTES // 2)
        refused = None
        for i in range(200):  # 100 MiB offered: the stream's 32 MiB share fills, nothing else does
            try:
                await js_publish(worker, subjects.instance_status("w1"), blob, f"fill-{i}")
            except nats.js.errors.APIError as err:
                refused = err
                break
        assert refused is not None and (await js.stream_info(streams.STREAM_STATUS)).state.bytes <= 32 << 20
        await js_publish(cli, subjects.SCALE, b'{"model": "m", "replicas": 1}', "scale-after-flood")  # still stored
    finally:
        await streams.delete_streams(js)
        for nc in (worker, cli, admin):
            await nc.close()


async def test_the_cli_replays_events_but_cannot_create_a_durable_consumer(
        nats_server: ServerProcess, credentials: Credentials) -> None:
    import json

    from ops.cli.reads import replay
    from shared.bus import streams
    from shared.bus.messages import UnschedulableEvent, encode
    from shared.settings import Settings

    admin = await nats.connect(nats_server.url)
    js = admin.jetstream()
    await streams.delete_streams(js)
    await streams.ensure_streams(js, Settings(js_storage="memory"))
    await js.publish(subjects.EVENT_UNSCHEDULABLE, encode(UnschedulableEvent(instance_id="x-1", model="x",
                                                                             message="no fit", at=1.0)))
    errors: list[str] = []

    async def on_error(err: Exception) -> None:
        errors.append(str(err))

    cli = await nats.connect(credentials.url(nats_server.url, "cli"), inbox_prefix="_INBOX.cli", error_cb=on_error)
    try:
        got = [m async for m in replay(cli.jetstream(), subjects.EVENTS_ALL, 1, until=1, stream=streams.STREAM_EVENTS)]
        assert [m.subject for m in got] == [subjects.EVENT_UNSCHEDULABLE]  # its replays still work
        config = {"durable_name": "kept-for-ever", "ack_policy": "explicit"}
        for subject in (f"$JS.API.CONSUMER.CREATE.{streams.STREAM_EVENTS}.kept-for-ever",
                        f"$JS.API.CONSUMER.DURABLE.CREATE.{streams.STREAM_EVENTS}.kept-for-ever",
                        f"$JS.API.CONSUMER.CREATE.{streams.STREAM_EVENTS}"):
            with contextlib.suppress(nats.errors.TimeoutError, nats.errors.NoRespondersError):
                answer = await cli.request(subject, json.dumps({"stream_name": streams.STREAM_EVENTS,
                                                                "config": config}).encode(), timeout=1)
                assert "error" in json.loads(answer.data), subject
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.consumer_info(streams.STREAM_EVENTS, "kept-for-ever")
    finally:
        await streams.delete_streams(js)
        await cli.close()
        await admin.close()


@pytest.mark.parametrize("identity", ["filter", "fitting", "scoring", "reconciler"])
async def test_a_service_may_hear_what_its_consumers_give_up_on_and_read_it_back(
        nats_server: ServerProcess, credentials: Credentials, identity: str) -> None:
    from shared.bus import streams
    from shared.bus.exhausted import advisory_subject, get_subject

    errors: list[str] = []

    async def on_error(err: Exception) -> None:
        errors.append(str(err))

    nc = await nats.connect(credentials.url(nats_server.url, identity), inbox_prefix=f"_INBOX.{identity}",
                            error_cb=on_error)
    try:
        mine = [(s, d) for s, d, _ in streams.ALL_CONSUMERS if d.startswith(identity)]
        assert mine
        for stream, durable in mine:
            await nc.subscribe(advisory_subject(stream, durable))
            with contextlib.suppress(nats.errors.TimeoutError, nats.errors.NoRespondersError):
                await nc.request(get_subject(stream), b'{"seq": 1}', timeout=0.5)
        await nc.flush()
        await asyncio.sleep(0.2)
        assert errors == []
        await nc.subscribe(advisory_subject(streams.STREAM_REQUESTED, "someone-else"))  # and no other consumer's
        await nc.flush()
        await asyncio.sleep(0.2)
        assert any("permissions violation" in e for e in errors)
    finally:
        await nc.close()
