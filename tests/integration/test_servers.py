"""The server launchers start real, reachable NATS (with JetStream) and Redis."""

from __future__ import annotations

from pathlib import Path

import nats
import redis.asyncio as aioredis

from ops.servers import COLOCATED_NATS_CPUS, ServerProcess, start_nats
from shared.bus import subjects


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
    msg = await sub.next_msg(timeout=2.0)
    assert msg.subject == subjects.engine_metrics("llama-3.1-8b-1a2b3c4d00")
    await nc.close()
