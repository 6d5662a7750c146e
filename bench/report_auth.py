"""CPU cost of checking engine report signatures on a picker's feed (``shared.host.report_auth``).

``python -m bench.report_auth``: per report, the check alone (a cached keyed HMAC over a real EngineMetrics
payload), and ``take_metrics`` without and with a verifier, interleaved in one window (CPU time, medians).
The signature also costs nats-py a header parse per message on the subscriber (~2.5 us: its
``_process_headers``), on the picker's loop or, with ``--feed-window-ms``, in the relay child.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.client import Client

from shared.bus.messages import EngineMetrics, encode
from shared.bus.runtime import Bus
from shared.core.routing import Router, builtin_config
from shared.host.engine_feed import EngineFeed, take_metrics
from shared.host.report_auth import ReportVerifier, derive_key, signed_headers

MASTER = bytes(range(32))
INSTANCE = "llama-8b-0123456789ab"


@dataclass(frozen=True)
class Delivered:
    """A delivered message, as the feed reads it."""

    subject: str
    data: bytes
    headers: dict[str, str] | None


def payload() -> bytes:
    """A load report as an engine server sends it."""
    return encode(EngineMetrics(
        instance_id=INSTANCE, model="llama-8b", url="http://127.0.0.1:40121", ts=time.time(), num_requests_running=12,
        num_requests_waiting=3, kv_cache_usage_perc=0.42, block_size=16, num_gpu_blocks=20000,
        prefix_cache_queries=123456, prefix_cache_hits=65432, prompt_tokens=9999999, generation_tokens=888888))


def cpu_us(f: Callable[[], object], n: int) -> float:
    """CPU microseconds per call of ``f``."""
    t = time.process_time()
    for _ in range(n):
        f()
    return (time.process_time() - t) / n * 1e6


async def feed_us(verifier: ReportVerifier | None, msg: Delivered, n: int) -> float:
    """CPU microseconds per ``take_metrics`` of ``msg``."""
    feed = EngineFeed(Router(builtin_config("default")), expire_s=1e9, verifier=verifier)
    bus, now = Bus(Client(), "bench"), time.time()
    t = time.process_time()
    for _ in range(n):
        await take_metrics(feed, bus, msg, now)
    return (time.process_time() - t) / n * 1e6


def main() -> None:
    """Print the figures."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("-n", type=int, default=20_000)
    a = p.parse_args()
    data = payload()
    headers = signed_headers(derive_key(MASTER, INSTANCE), data)
    verifier = ReportVerifier(MASTER)
    check = statistics.median(cpu_us(lambda: verifier.valid(INSTANCE, data, headers), a.n) for _ in range(a.runs))
    print(f"payload {len(data)} B; signature check {check:.2f} us CPU per report")
    msg = Delivered(f"gantry.engine.metrics.{INSTANCE}", data, headers)
    plain, checked = [], []
    for _ in range(a.runs):  # interleaved: both see the same host load
        plain.append(asyncio.run(feed_us(None, msg, a.n)))
        checked.append(asyncio.run(feed_us(ReportVerifier(MASTER), msg, a.n)))
    print(f"take_metrics: unchecked {statistics.median(plain):.2f} us, checked {statistics.median(checked):.2f} us "
          f"CPU per report (medians of {a.runs})")


if __name__ == "__main__":
    main()
