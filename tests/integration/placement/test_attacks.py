"""The three attacks of issue 13 against a running stack (auth on, as every stack runs), each refused:

1. a fake worker's heartbeat and registration, to be given replicas;
2. a forged registration under a real worker's name (and a real worker changing the GPU it holds claims on);
3. a direct write of the ledger's GPU capacity in Redis;

and a compromised placement service reconfiguring a stream or another service's durable consumer.

The attacker holds the credentials of another worker agent (``worker-w2``: a compromised agent), or none.
"""

from __future__ import annotations

import asyncio

import nats
import nats.errors
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from nats.aio.client import Client
from nats.js.api import StreamConfig

from ops.auth import Credentials, without_userinfo
from shared.bus import streams, subjects
from shared.bus.messages import Heartbeat, WorkerRegistration, encode
from shared.core.placement.domain import GIB, Gpu, InstanceState, ModelSpec, Worker
from shared.state.store import Keys, gpu_field

from .conftest import Stack, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

BIG = ModelSpec(name="big", source="x/big", weight_bytes=8 * GIB, vram_claim=70 * GIB)
SMALL = ModelSpec(name="small", source="x/small", weight_bytes=4 * GIB)
ATTACKER = "worker-w2"


async def start(stack: Stack) -> None:
    """Two real workers, w0 and w1, one 80 GiB GPU each, and the four services."""
    stack.start_workers("fleet", "--count", "2", "--gpus", "1", "--prefix", "w", "--heartbeat-interval", "0.2")
    stack.start_services()
    await stack.wait_ready(workers=2)


async def connect_as(stack: Stack, identity: str) -> tuple[Client, list[str]]:
    creds = stack.launcher.credentials
    assert creds is not None
    errors: list[str] = []

    async def on_error(err: Exception) -> None:
        errors.append(str(err))

    nc = await nats.connect(creds.url(stack.launcher.settings.nats_url, identity), error_cb=on_error)
    return nc, errors


def huge_worker(name: str) -> Worker:
    return Worker(name=name, gpus=tuple(Gpu(index=i, vram_total=240 * GIB) for i in range(8)), ram_total=1 << 40)


async def settled(stack: Stack, model: str, running: int, pending: int) -> bool:
    states = await stack.states(model)
    return states.get(InstanceState.RUNNING, 0) == running and states.get(InstanceState.PENDING, 0) == pending


async def test_a_fake_worker_gets_no_replica(stack: Stack) -> None:
    await start(stack)
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):  # no credentials: no connection
        await nats.connect(without_userinfo(stack.launcher.settings.nats_url), allow_reconnect=False)
    nc, errors = await connect_as(stack, ATTACKER)
    try:
        fake = huge_worker("evil")
        # On the fake worker's own subjects: the bus refuses them to this identity.
        await nc.publish(subjects.worker_register("evil"), encode(WorkerRegistration(worker=fake)))
        await nc.publish(subjects.worker_heartbeat("evil"), encode(Heartbeat(worker="evil")))
        # On the attacker's own subjects, naming the fake worker: the state writer refuses the impersonation.
        await nc.publish(subjects.worker_register("w2"), encode(WorkerRegistration(worker=fake)))
        await nc.publish(subjects.worker_heartbeat("w2"), encode(Heartbeat(worker="evil")))
        await nc.flush()
        await wait_until(lambda: _dead_letter(stack, "impersonation refused"), 30, "impersonation dead letter")
        assert any("permissions violation" in e.lower() and "evil" in e for e in errors)
        # One replica fits per GPU: the real workers take two, the other two wait (no fake worker takes them).
        await stack.scale(SMALL, 4)
        await wait_until(lambda: settled(stack, "small", 2, 2), 30, "2 RUNNING on the real workers, 2 PENDING")
        await asyncio.sleep(1.0)
        assert await settled(stack, "small", 2, 2)

        assert {i.worker for i in await stack.instances("small") if i.worker} == {"w0", "w1"}
        assert await stack.store.worker_names() == {"w0", "w1"}
    finally:
        await nc.close()
    assert stack.crashed() == []


async def test_a_forged_registration_under_a_real_name_is_refused(stack: Stack) -> None:
    await start(stack)
    nc, errors = await connect_as(stack, ATTACKER)
    try:
        forged = encode(WorkerRegistration(worker=huge_worker("w0")))
        await nc.publish(subjects.worker_register("w0"), forged)  # w0's subject: refused by the bus
        await nc.publish(subjects.worker_register("w2"), forged)  # own subject, w0's name: refused by the writer
        await nc.flush()
        await wait_until(lambda: _dead_letter(stack, "impersonation refused"), 30, "impersonation dead letter")
        assert any("permissions violation" in e.lower() and "w0" in e for e in errors)
        # Three 70 GiB replicas on two 80 GiB GPUs: two run, one waits; nothing is overbooked.
        await stack.scale(BIG, 3)
        await wait_until(lambda: settled(stack, "big", 2, 1), 30, "2 RUNNING and 1 PENDING")
        await asyncio.sleep(1.0)  # several re-registrations later, still the same
        assert await settled(stack, "big", 2, 1)
        assert await stack.store.overbooked() == []
        assert await stack.store.r.hget(Keys.gpu_cap, gpu_field("w0", 0)) == str(80 * GIB).encode()
    finally:
        await nc.close()
    assert stack.crashed() == []


async def test_a_worker_cannot_change_a_gpu_it_holds_claims_on(stack: Stack) -> None:
    await start(stack)
    await stack.scale(BIG, 2)
    await wait_until(lambda: settled(stack, "big", 2, 0), 30, "2 RUNNING")
    # w0's own identity (a real agent, or its compromise) re-registers w0 with a GPU three times larger.
    nc, _ = await connect_as(stack, "worker-w0")
    try:
        await nc.publish(subjects.worker_register("w0"), encode(WorkerRegistration(worker=huge_worker("w0"))))
        await nc.flush()
        await wait_until(lambda: _dead_letter(stack, "while it holds claims"), 30, "inventory-change dead letter")
        await stack.scale(BIG, 4)
        await wait_until(lambda: settled(stack, "big", 2, 2), 30, "still 2 RUNNING, 2 PENDING")
        assert await stack.store.overbooked() == []
        assert await stack.store.r.hget(Keys.gpu_cap, gpu_field("w0", 0)) == str(80 * GIB).encode()
    finally:
        await nc.close()


async def test_a_forged_registration_followed_at_once_by_the_genuine_one_is_still_dead_lettered(stack: Stack) -> None:
    await start(stack)
    await stack.scale(BIG, 2)
    await wait_until(lambda: settled(stack, "big", 2, 0), 30, "2 RUNNING")
    real = Worker(name="w0", gpus=(Gpu(index=0, vram_total=80 * GIB),), ram_total=1024 * GIB)
    nc, _ = await connect_as(stack, "worker-w0")
    try:
        # both land in one writer batch: the genuine one replaces the forged one there, which must not hide it
        await nc.publish(subjects.worker_register("w0"), encode(WorkerRegistration(worker=huge_worker("w0"))))
        await nc.publish(subjects.worker_register("w0"), encode(WorkerRegistration(worker=real)))
        await nc.flush()
        await wait_until(lambda: _dead_letter(stack, "while it holds claims"), 30, "inventory-change dead letter")
        assert await stack.store.r.hget(Keys.gpu_cap, gpu_field("w0", 0)) == str(80 * GIB).encode()
        assert await stack.store.overbooked() == []
    finally:
        await nc.close()


async def test_a_direct_redis_write_of_the_ledger_is_refused(stack: Stack) -> None:
    await start(stack)
    creds: Credentials | None = stack.launcher.credentials
    assert creds is not None
    url = stack.launcher.settings.redis_url
    for identity in ("", "filter", "scoring", "cli", "workers", ATTACKER):  # none, readers, no Redis user
        client = aioredis.from_url(creds.url(url, identity) if identity else without_userinfo(url))
        try:
            with pytest.raises(redis.exceptions.RedisError):
                await client.hset(Keys.gpu_cap, gpu_field("w0", 0), str(240 * GIB))
        finally:
            await client.aclose()
    await stack.scale(BIG, 3)
    await wait_until(lambda: settled(stack, "big", 2, 1), 30, "2 RUNNING and 1 PENDING")
    assert await stack.store.overbooked() == []
    assert await stack.store.r.hget(Keys.gpu_cap, gpu_field("w0", 0)) == str(80 * GIB).encode()


async def test_a_service_cannot_reconfigure_a_stream_or_another_services_consumer(stack: Stack) -> None:
    await start(stack)
    js_admin = stack.nc.jetstream()
    before = (await js_admin.stream_info(streams.STREAM_CMD)).config
    nc, errors = await connect_as(stack, "filter")  # a compromised filter, with the filter's own credentials
    js = nc.jetstream(timeout=1.0)
    try:
        shrunk = StreamConfig(name=streams.STREAM_CMD, subjects=[subjects.CMD_ALL], max_msgs=1)
        with pytest.raises(nats.errors.Error):  # refused by the server: no reply ever comes
            await js.update_stream(shrunk)
        with pytest.raises(nats.errors.Error):
            await js.add_stream(shrunk)
        rewritten = streams.consumer_config(streams.CONSUMER_SCALE, subjects.SCALE, stack.launcher.settings)
        with pytest.raises(nats.errors.Error):  # the reconciler's durable, narrowed to scale commands
            await js.add_consumer(streams.STREAM_CMD, rewritten)
        await nc.flush()
        assert any("permissions violation" in e.lower() and "STREAM.UPDATE" in e.upper() for e in errors)
    finally:
        await nc.close()
    after = await js_admin.stream_info(streams.STREAM_CMD)
    assert (after.config.max_msgs, after.config.subjects) == (before.max_msgs, before.subjects)
    consumer = await js_admin.consumer_info(streams.STREAM_CMD, streams.CONSUMER_SCALE)
    assert consumer.config.filter_subject == subjects.CMD_ALL
    await stack.scale(SMALL, 2)  # the stack still places end to end
    await wait_until(lambda: settled(stack, "small", 2, 0), 30, "2 RUNNING")
    assert stack.crashed() == []


async def _dead_letter(stack: Stack, fragment: str) -> bool:
    return any(e.service == "reconciler" and fragment in e.reason for e in stack.dead_letters)
