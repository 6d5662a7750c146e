"""Pushes the server's load on NATS every 50-100 ms (routing spec §1, model-server protocol)."""

from __future__ import annotations

import asyncio
import logging
import time

import nats
from nats.aio.client import Client as NatsClient

from services.engine_server.runner import EngineRunner
from shared.bus import subjects
from shared.bus.messages import EngineMetrics, encode

log = logging.getLogger(__name__)


def snapshot(runner: EngineRunner, instance_id: str, model: str, url: str) -> EngineMetrics:
    """The current figures as a bus message."""
    s = runner.engine.scheduler
    c = s.counters
    return EngineMetrics(
        instance_id=instance_id, model=model, url=url, ts=time.time(),
        num_requests_running=len(s.running), num_requests_waiting=s.num_waiting,
        kv_cache_usage_perc=s.kv_usage, block_size=s.config.block_size, num_gpu_blocks=s.config.num_gpu_blocks,
        prefix_cache_queries=c.prefix_queries, prefix_cache_hits=c.prefix_hits, num_preemptions=c.preemptions,
        prompt_tokens=c.prompt_tokens, generation_tokens=c.generation_tokens,
    )


async def publish_loop(
    runner: EngineRunner, nats_url: str, instance_id: str, model: str, url: str, interval_s: float = 0.075
) -> None:
    """Connect (retrying) and publish EngineMetrics until cancelled; a NATS outage never stops serving."""
    subject = subjects.engine_metrics(instance_id)
    nc: NatsClient | None = None
    try:
        while True:
            if nc is None or not nc.is_connected:
                try:
                    nc = await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=-1)
                except Exception as err:
                    log.warning("metrics publisher: cannot reach NATS at %s: %s", nats_url, err)
                    nc = None
                    await asyncio.sleep(1.0)
                    continue
            try:
                await nc.publish(subject, encode(snapshot(runner, instance_id, model, url)))
            except Exception as err:
                log.warning("metrics publisher: publish failed: %s", err)
            await asyncio.sleep(interval_s)
    finally:
        if nc is not None and nc.is_connected:
            await nc.drain()
