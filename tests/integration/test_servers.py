"""The server launchers start real, reachable NATS (with JetStream) and Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest
import redis.asyncio as aioredis

from ops.auth import ADMIN
from ops.servers import COLOCATED_NATS_CPUS, ServerProcess, free_port, start_nats
from ops.stack import LocalStack
from shared.bus import subjects
from shared.bus.runtime import nats_options
from shared.bus.streams import ALL_CONSUMERS, ALL_STREAMS
from shared.settings import Settings


async def test_nats_server_accepts_jetstream_publishes(nats_server: ServerProcess) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(name="SMOKE", subjects=["smoke.>"])
    ack = await js.publish("smoke.one", b"x")
    assert ack.seq == 1
    await nc.close()


async def test_redis_server_round_trips_a_key(redis_server: ServerProcess) -> None:
    client = aioredis.from_url(redis_server.url)
    await client.set("smoke", "ok")
    assert await client.get("smoke") == b"ok"
    await client.aclose()


def test_a_colocated_nats_runs_on_the_cpus_it_is_given(tmp_path: Path) -> None:
    srv = start_nats(tmp_path / "nats", cpus=COLOCATED_NATS_CPUS)
    try:
        environ = Path(f"/proc/{srv.process.pid}/environ").read_bytes().split(b"\0")
        assert f"GOMAXPROCS={COLOCATED_NATS_CPUS}".encode() in environ
    finally:
        srv.stop()


async def test_metrics_of_an_instance_of_a_dotted_model_reach_the_all_engines_subscription(
    nats_server: ServerProcess,
) -> None:
    nc = await nats.connect(nats_server.url)
    sub = await nc.subscribe(subjects.ENGINE_METRICS_ALL)
    await nc.publish(subjects.engine_metrics("llama-3.1-8b-1a2b3c4d00"), b"{}")
    await nc.flush()  # the server has routed it; a wrong subject match still never delivers it
    msg = await sub.next_msg(timeout=10)  # the client's reading task may be scheduled late on a loaded host
    assert msg.subject == subjects.engine_metrics("llama-3.1-8b-1a2b3c4d00")
    await nc.close()


async def test_a_nats_restarted_with_memory_storage_is_provisioned_again(tmp_path: Path) -> None:
    settings = Settings(nats_url=f"nats://127.0.0.1:{free_port()}", redis_url=f"redis://127.0.0.1:{free_port()}/0",
                        js_storage="memory")
    stack = LocalStack(settings, home=tmp_path)  # the default services: none started, the streams are theirs
    try:
        await asyncio.to_thread(stack.start_servers)
        await asyncio.to_thread(stack.provision)
        stack.kill_server("nats")
        await asyncio.to_thread(stack.restart_server, "nats")
        admin = stack.settings_for(ADMIN)
        nc = await nats.connect(admin.nats_url, **nats_options(admin))
        try:
            js = nc.jetstream()
            assert {s.config.name for s in await js.streams_info()} >= set(ALL_STREAMS)
            for stream, durable, _ in ALL_CONSUMERS:
                await js.consumer_info(stream, durable)  # raises NotFoundError if it was lost
        finally:
            await nc.close()
    finally:
        await asyncio.to_thread(stack.stop)


async def _connects(url: str) -> bool:
    try:
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2, max_reconnect_attempts=0)
    except Exception:
        return False
    await nc.close()
    return True


def test_a_worker_added_and_a_secret_rotated_apply_at_a_nats_reload(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import signal
    import time

    from ops.auth import Credentials, main

    monkeypatch.setenv("GANTRY_HOME", str(tmp_path))
    creds = Credentials.ensure(tmp_path)  # as `gantry up` does first
    server = start_nats(tmp_path / "nats", auth=creds)
    try:
        old_cli = creds.url(server.url, "cli")
        assert main(["add-worker", "gpu-node-17"]) == 0 and main(["rotate", "cli"]) == 0
        server.process.send_signal(signal.SIGHUP)  # nats-server --signal reload
        time.sleep(1.0)
        new = Credentials.load(tmp_path / "credentials.json")
        assert asyncio.run(_connects(new.url(server.url, "worker-gpu-node-17")))  # before: refused
        assert asyncio.run(_connects(new.url(server.url, "cli")))  # before: refused
        assert not asyncio.run(_connects(old_cli))  # before: still connected
    finally:
        server.stop()
