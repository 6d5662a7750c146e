"""What the ZMQ replay endpoint (``--kv-events-replay-endpoint``) costs the engine server's step loop.

1. ``publish_ns``: CPU time (``time.thread_time``) of ``ZmqKVPublisher.publish`` per KV-event batch, without and
   with a replay buffer, on the batches of a 16-stream run: the server's own engine (Llama-3.1-8B on one H100,
   block size 16) in virtual time, 16 requests of 128 distinct token ids and ``--tokens`` output tokens
   (``ignore_eos``), one batch per step that had events, as the server publishes them. One SUB subscriber is
   connected (drained between rounds, untimed). The two kinds take turns (each going first in every other
   round), ``--rounds`` rounds each; medians.
2. ``replay``: a requester (a DEALER in another process) asks for all of a full buffer of ``--buffer`` of those
   batches. Reported: the event-loop thread's CPU per replayed batch and per pass of the replay task (the step
   loop shares that thread: a step waits at most one pass); medians over ``--runs``.

Run: ``.venv/bin/python bench/zmq_replay.py [--rounds 15] [--runs 5] [--tokens 256] [--buffer 10000]``.
Prints one JSON line. The host is shared: run it in a quiet window and note ``uptime`` beside the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import zmq  # noqa: E402

from services.engine_server.kv_replay import ReplayBuffer, ReplayDesk  # noqa: E402
from services.engine_server.server import ServerOptions, build_engine  # noqa: E402
from services.engine_server.zmq_events import ZmqKVPublisher  # noqa: E402
from services.engine_server.zmq_replay import ZmqReplayServer  # noqa: E402
from shared.core.engine import Request  # noqa: E402
from shared.core.kv_events import KVEventBatch, encode_batch  # noqa: E402

ENDPOINTS = (f"inproc://bench-zmq-replay-{i}" for i in itertools.count())


def batches_of_a_run(streams: int, tokens: int) -> tuple[list[KVEventBatch], int]:
    """The KV-event batches the server's engine publishes for ``streams`` concurrent requests, and its steps."""
    engine = build_engine(ServerOptions(kv_events_zmq="inproc://unused"))
    for i in range(streams):
        prompt = [(i * 128 + j) % 4000 + 10 for j in range(128)]
        engine.add_request(Request(f"r{i}", prompt, max_tokens=tokens, ignore_eos=True))
    out, steps = [], 0
    while engine.has_work():
        engine.step()
        steps += 1
        if (batch := engine.take_kv_events()) is not None:
            out.append(batch)
    return out, steps


def _drain(sock: Any) -> None:
    while sock.poll(0):
        sock.recv_multipart()


def publish_ns(batches: list[KVEventBatch], rounds: int) -> dict[str, float]:
    """Median CPU ns per ``publish`` without and with a replay buffer, rounds interleaved."""
    pubs = {"off": ZmqKVPublisher(next(ENDPOINTS)), "on": ZmqKVPublisher(next(ENDPOINTS), replay=ReplayBuffer(10_000))}
    subs = {}
    for kind, pub in pubs.items():
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 1_000_000)
        sub.connect(pub.endpoint)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        while not sub.poll(10):  # the subscription has reached the publisher once a batch arrives
            pub.publish(batches[0])
        subs[kind] = sub
    got: dict[str, list[float]] = {k: [] for k in pubs}
    for r in range(rounds):
        for kind in sorted(pubs, reverse=bool(r % 2)):  # alternate which goes first
            pub = pubs[kind]
            _drain(subs[kind])
            t0 = time.thread_time_ns()
            for b in batches:
                pub.publish(b)
            got[kind].append((time.thread_time_ns() - t0) / len(batches))
    for kind, pub in pubs.items():
        subs[kind].close(linger=0)
        pub.close()
    return {k: statistics.median(v) for k, v in got.items()}


REQUESTER = """
import sys, zmq
sock = zmq.Context.instance().socket(zmq.DEALER)
sock.connect(sys.argv[1])
sock.send_multipart([b"", (0).to_bytes(8, "big")])
n = 0
while sock.recv_multipart()[1] != b"\\xff" * 8:
    n += 1
print(n)
"""


async def one_replay(payloads: list[bytes]) -> dict[str, float]:
    """Serve one replay of the whole buffer to a DEALER in another process: the loop thread's CPU per batch replayed
    and per pass (the longest a step can wait for one)."""
    buf = ReplayBuffer(len(payloads))
    for p in payloads:
        buf.add(p)
    server = ZmqReplayServer("tcp://127.0.0.1:*", ReplayDesk(buf))
    passes: list[int] = []
    serve_pass = server._pass

    def timed_pass(now: float) -> bool:
        t = time.thread_time_ns()
        more = serve_pass(now)
        passes.append(time.thread_time_ns() - t)
        return more

    server._pass = timed_pass  # type: ignore[method-assign]
    task = asyncio.create_task(server.run())
    await asyncio.sleep(0.05)
    c0, t0 = time.thread_time(), time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", REQUESTER, server.endpoint], stdout=subprocess.PIPE, text=True)
    while child.poll() is None:
        await asyncio.sleep(0.001)
    cpu, wall = time.thread_time() - c0, time.perf_counter() - t0
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    server.close()
    assert child.stdout is not None and int(child.stdout.read()) == len(payloads)
    return {"cpu_us_per_batch": cpu / len(payloads) * 1e6, "wall_s": wall, "passes": len(passes),
            "pass_cpu_us_median": statistics.median(passes) / 1e3, "pass_cpu_us_max": max(passes) / 1e3}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--buffer", type=int, default=10_000)
    ap.add_argument("--publishes", type=int, default=2_000, help="batches published per round (the run's, cycled)")
    a = ap.parse_args()
    batches, steps = batches_of_a_run(16, a.tokens)
    payloads = [encode_batch(b) for b in batches]
    pub = publish_ns(list(itertools.islice(itertools.cycle(batches), a.publishes)), a.rounds)
    full = list(itertools.islice(itertools.cycle(payloads), a.buffer))
    runs = [asyncio.run(one_replay(full)) for _ in range(a.runs)]
    print(json.dumps({
        "batches": len(batches), "steps": steps, "mean_batch_bytes": round(statistics.mean(map(len, payloads))),
        "publish_ns_off": round(pub["off"]), "publish_ns_on": round(pub["on"]),
        "replay": {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]},
        "load": os.getloadavg()[0],
    }))


if __name__ == "__main__":
    main()
