"""The services' hand-written JetStream pull loop against FastStream's own pull subscriber, on a real nats-server.

Both consume one durable pull consumer in batches of up to 64, decode each message with msgspec (a small
``PlacementRequest``) and ack it. Two figures per path:

- throughput: 10,000 messages stored before the consumer starts, time (wall and this process's CPU) until
  every one is handled and acked;
- lone-message latency: the consumer idle, one message published every 20 ms, time from publish to handled
  (p50, p99 over 200 messages, and stalls: messages held over 1 s, until a redelivery after the ack wait):
  what one hop of the placement pipeline costs at light load.

Run: ``.venv/bin/python bench/bus_pull.py [--runs 3]``. Prints a JSON line per run and a final JSON summary
(medians over runs); writes docs/benchmarks/bus_pull.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import nats  # noqa: E402
from faststream.nats import JStream, NatsBroker, PullSub  # noqa: E402
from nats.aio.client import Client  # noqa: E402
from nats.aio.msg import Msg  # noqa: E402
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig  # noqa: E402

from ops.servers import start_nats  # noqa: E402
from shared.bus.messages import PlacementItem, PlacementRequest, decode, encode  # noqa: E402
from shared.bus.pull import pull_loop  # noqa: E402

OUT = REPO / "docs" / "benchmarks"
STREAM, SUBJECT, BATCH = "BENCH", "bench.pull", 64
THROUGHPUT_MSGS, LATENCY_MSGS, GAP_S = 10_000, 200, 0.02
# FastStream's batch fetch waits for a full batch up to this long (its default, 5 s, holds a lone message
# back up to 5 s); 10 ms loses fetched messages until redelivery when the first one is late (a fetch that
# times out drops what arrives after): 100 ms is the shortest that ran the backlog without such stalls here.
FASTSTREAM_TIMEOUT_S = 0.1
ACK_WAIT_S = 2.0  # a message caught by an abandoned pull request waits this long for its redelivery
STALL_MS = 1000.0
ITEM = PlacementItem(instance_id="llama-8b-0a1b2c3d4e", model="llama-8b")
PAYLOAD = encode(PlacementRequest(batch_id="b", items=(ITEM,), specs={}))
FIGURES = ("msgs_per_s", "cpu_us_per_msg", "lone_p50_ms", "lone_p99_ms", "lone_stalls")

Handled = Callable[[int], None]
Starter = Callable[[Client, str, Handled], Awaitable[Callable[[], Awaitable[None]]]]


async def start_hand_written(nc: Client, durable: str, handled: Handled) -> Callable[[], Awaitable[None]]:
    """The services' path: ``shared.bus.runtime.pull_loop`` with a handler that decodes and acks."""

    async def handler(msgs: list[Msg]) -> None:
        for m in msgs:
            decode(m.data, PlacementRequest)
            await m.ack()
        handled(len(msgs))

    task = asyncio.ensure_future(pull_loop(nc, STREAM, durable, SUBJECT, BATCH, handler))

    async def stop() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    return stop


async def start_faststream(nc: Client, durable: str, handled: Handled) -> Callable[[], Awaitable[None]]:
    """FastStream's pull subscriber in batch mode (it acks each message after the handler returns)."""
    quiet = logging.getLogger("bench.faststream")
    quiet.setLevel(logging.WARNING)
    broker = NatsBroker(nc.connected_url.geturl() if nc.connected_url else "", logger=quiet)

    async def raw_bodies(msg: Any) -> Any:  # hand the handler the raw bytes: msgspec decodes, as in the services
        return msg.body

    @broker.subscriber(
        SUBJECT, stream=JStream(STREAM, declare=False), durable=durable, decoder=raw_bodies,
        pull_sub=PullSub(batch_size=BATCH, batch=True, timeout=FASTSTREAM_TIMEOUT_S),
    )
    async def handler(bodies: list[Any]) -> None:
        for body in bodies:
            decode(body, PlacementRequest)
        handled(len(bodies))

    await broker.start()
    return broker.stop


PATHS: dict[str, Starter] = {"hand-written pull_loop": start_hand_written, "FastStream PullSub": start_faststream}


async def measure(nc: Client, name: str, start: Starter, run: int) -> dict[str, Any]:
    js = nc.jetstream()
    durable = f"d{run}{abs(hash(name)) % 10_000}"
    await js.add_consumer(STREAM, ConsumerConfig(durable_name=durable, filter_subject=SUBJECT,
                                                  ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT_S,
                                                  max_ack_pending=20_000))
    count = 0
    arrived = asyncio.Event()

    def handled(n: int) -> None:
        nonlocal count
        count += n
        arrived.set()

    for _ in range(THROUGHPUT_MSGS):
        await js.publish(SUBJECT, PAYLOAD)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    stop = await start(nc, durable, handled)
    while count < THROUGHPUT_MSGS:
        arrived.clear()
        try:
            await asyncio.wait_for(arrived.wait(), 30)
        except TimeoutError:
            raise TimeoutError(f"{name}: {count} of {THROUGHPUT_MSGS} handled after 30 s without progress") from None
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    latencies = []
    for _ in range(LATENCY_MSGS):
        before = count
        arrived.clear()
        sent = time.perf_counter()
        await js.publish(SUBJECT, PAYLOAD)
        while count == before:
            await asyncio.wait_for(arrived.wait(), 10 * ACK_WAIT_S)
            arrived.clear()
        latencies.append((time.perf_counter() - sent) * 1000)
        await asyncio.sleep(GAP_S)
    await stop()
    await js.delete_consumer(STREAM, durable)
    await js.purge_stream(STREAM)
    q = statistics.quantiles(latencies, n=100)
    return {
        "path": name, "run": run, "msgs_per_s": round(THROUGHPUT_MSGS / wall),
        "cpu_us_per_msg": round(cpu / THROUGHPUT_MSGS * 1e6, 1),
        "lone_p50_ms": round(q[49], 2), "lone_p99_ms": round(q[98], 2),
        "lone_stalls": sum(1 for v in latencies if v > STALL_MS),  # held until a redelivery
    }


async def main(runs: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        server = start_nats(Path(tmp))
        try:
            nc = await nats.connect(server.url)
            await nc.jetstream().add_stream(StreamConfig(name=STREAM, subjects=[SUBJECT], storage=StorageType.MEMORY))
            results = []
            for run in range(runs):
                for name, start in PATHS.items():
                    res = await measure(nc, name, start, run)
                    print(json.dumps(res), flush=True)
                    results.append(res)
            await nc.close()
            return results
        finally:
            server.stop()


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in PATHS:
        rows = [r for r in results if r["path"] == name]
        out[name] = {k: statistics.median(r[k] for r in rows) for k in FIGURES}
    return {"bench": "bus_pull", "runs": len(results) // len(PATHS), "batch": BATCH, "medians": out}


def plot(summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["medians"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, key, label in zip(axes, ("msgs_per_s", "cpu_us_per_msg", "lone_p99_ms"),
                              ("messages/s (10k backlog)", "CPU µs per message", "lone message p99 (ms)"), strict=True):
        ax.bar(range(len(names)), [summary["medians"][n][key] for n in names], color=["tab:blue", "tab:orange"])
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_title(label, fontsize=9)
    runs = summary["runs"]
    fig.suptitle(f"JetStream pull consumption, batch {BATCH}, medians of {runs} runs (shared 2-core machine)")
    fig.tight_layout()
    fig.savefig(OUT / "bus_pull.png", dpi=100)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results = asyncio.run(main(args.runs))
    summary = summarise(results)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "bus_pull.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=2) + "\n")
    plot(summary)
    print(json.dumps(summary))
