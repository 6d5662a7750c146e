"""CPU cost of checking engine report signatures on a picker's feed (``shared.host.report_auth``).

``python -m bench.report_auth``: per report, the check alone (a cached keyed HMAC over a real EngineMetrics
payload and its stamp, and the stamp compared with the last one taken), and ``take_metrics`` without and with a
verifier, interleaved in one window (CPU time, medians). Every report is signed with its own stamp beforehand, as
a server's successive reports are (a repeated one would be refused as a replay).
The signature also costs nats-py a header parse per message on the subscriber (~2.5 us: its
``_process_headers``), on the picker's loop or, with ``--feed-window-ms``, in the relay child.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass

from nats.aio.client import Client

from shared.bus.messages import EngineMetrics, encode
from shared.bus.runtime import Bus
from shared.core.routing import Router, builtin_config
from shared.host.engine_feed import EngineFeed, take_metrics
from shared.host.report_auth import ACCEPTED, METRICS, ReportSigner, ReportVerifier, derive_key, signed_headers

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


def stamped(data: bytes, n: int) -> list[Delivered]:
    """``n`` reports of one server process, each signed with its own stamp."""
    signer = ReportSigner(derive_key(MASTER, INSTANCE))
    subject = f"gantry.engine.metrics.{INSTANCE}"
    return [Delivered(subject, data, signed_headers(signer, METRICS, data)) for _ in range(n)]


def check_us(msgs: list[Delivered]) -> float:
    """CPU microseconds per ``ReportVerifier.check`` of each of ``msgs`` (all accepted)."""
    verifier = ReportVerifier(MASTER)
    t = time.process_time()
    for m in msgs:
        verifier.check(INSTANCE, m.data, m.headers, METRICS)
    spent = (time.process_time() - t) / len(msgs) * 1e6
    assert verifier.check(INSTANCE, msgs[-1].data, msgs[-1].headers, METRICS) is not ACCEPTED  # a replay now
    return spent


async def feed_us(verifier: ReportVerifier | None, msgs: list[Delivered]) -> float:
    """CPU microseconds per ``take_metrics`` of each of ``msgs``."""
    feed = EngineFeed(Router(builtin_config("default")), expire_s=1e9, verifier=verifier)
    bus, now = Bus(Client(), "bench"), time.time()
    t = time.process_time()
    for m in msgs:
        await take_metrics(feed, bus, m, now)
    spent = (time.process_time() - t) / len(msgs) * 1e6
    assert verifier is None or verifier.dropped == 0
    return spent


def main() -> None:
    """Print the figures."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("-n", type=int, default=20_000)
    a = p.parse_args()
    data = payload()
    msgs = stamped(data, a.n)
    check = statistics.median(check_us(msgs) for _ in range(a.runs))
    print(f"payload {len(data)} B; signature and stamp check {check:.2f} us CPU per report")
    plain, checked = [], []
    for _ in range(a.runs):  # interleaved: both see the same host load
        plain.append(asyncio.run(feed_us(None, msgs)))
        checked.append(asyncio.run(feed_us(ReportVerifier(MASTER), msgs)))
    print(f"take_metrics: unchecked {statistics.median(plain):.2f} us, checked {statistics.median(checked):.2f} us "
          f"CPU per report (medians of {a.runs})")


if __name__ == "__main__":
    main()
