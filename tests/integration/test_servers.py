"""The server launchers start real, reachable NATS (with JetStream) and Redis."""

from __future__ import annotations

from pathlib import Path

import nats
import redis.asyncio as aioredis

from ops.servers import COLOCATED_NATS_CPUS, ServerProcess, start_nats


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
