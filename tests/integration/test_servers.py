"""The server launchers start real, reachable NATS (with JetStream) and Redis."""

from __future__ import annotations

import nats
import redis.asyncio as aioredis

from ops.servers import ServerProcess


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
