"""The NATS picker under load: reply latency and CPU per pick at 1,000 picks/s, with engine reports and KV
events flowing, on a real nats-server.

Setup: nats-server (auth on, as in every stack), the picker (``python -m services.picker``, default profile,
as its own least-privilege identity) and this driver, all on this machine. The driver plays the engines:
``--endpoints`` model servers each publish an ``EngineMetrics`` report every 50 ms (load drawn at random; from
a process of its own, so that a busy driver never makes them stale) and, every 50 ms, the KV events of the
prompts placed on them since (``BlockStored`` with the engines' chained hashes, numbered per instance), as an
engine does after prefill.
Requests: ``--tenants`` tenants, each prompt a tenant's shared ``--prefix-tokens`` plus a unique tail, of
``--prompt-tokens`` token ids in all; one request per ``PickRequest`` message, sent open loop at ``--rate``
per second (request/reply, each on its own task) for ``--seconds`` after a ``--warmup``; each placed request
is reported first-token after 0.2 s and finished after 1 s (``PickProgress``, batched every 50 ms), so the
picker's in-flight accounting runs as in service. Payloads are encoded before the clock starts.

Measured per run: reply latency (send to reply, the driver's clock) p50/p90/p99/max; the picker process's CPU
seconds (user + system, psutil) over the measured window divided by its picks; lost = requests sent without an
answer within 5 s (0 expected), refusals by code; the rate actually offered. The machine load average is
printed beside (2 shared cores).

Run: ``.venv/bin/python bench/picker_service.py [--rate 1000] [--seconds 20] [--runs 3]``. Prints one JSON
line per run and a final summary line; writes docs/benchmarks/picker_service.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import nats  # noqa: E402
import psutil  # noqa: E402
import uvloop  # noqa: E402
from nats.aio.client import Client  # noqa: E402

from ops.auth import Credentials  # noqa: E402
from ops.servers import start_nats  # noqa: E402
from shared.bus import subjects  # noqa: E402
from shared.bus.messages import (  # noqa: E402
    EngineKVEvents,
    EngineMetrics,
    PickItem,
    PickProgress,
    PickReply,
    PickRequest,
    decode,
    encode,
)
from shared.core.kv_events import BlockStored, KVEventBatch, chain_hashes  # noqa: E402

OUT = REPO / "docs" / "benchmarks"
MODEL = "bench-model"
REPORT_S = 0.05
FIRST_TOKEN_S, FINISH_S = 0.2, 1.0
REPLY_TIMEOUT_S = 5.0


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def report_metrics(admin_url: str, ids: list[str], seed: int, stop: Any) -> None:
    """The engines' state reports (a process of their own, so a busy driver never makes them late)."""
    import uvloop

    async def loop() -> None:
        rng = random.Random(seed)
        nc = await nats.connect(admin_url)
        while not stop.is_set():
            t = time.time()
            for i, eid in enumerate(ids):
                m = EngineMetrics(instance_id=eid, model=MODEL, url=f"http://10.1.{i // 200}.{i % 200}:8000", ts=t,
                                  num_requests_running=rng.randrange(48), num_requests_waiting=rng.randrange(3),
                                  kv_cache_usage_perc=rng.random() * 0.6, block_size=16, num_gpu_blocks=30_000)
                await nc.publish(subjects.engine_metrics(eid), encode(m))
            await nc.flush()
            await asyncio.sleep(max(0.0, REPORT_S - (time.time() - t)))
        await nc.drain()

    uvloop.run(loop())


class Engines:
    """What the engines say after a request is placed on them: the KV events of its prompt (as after prefill),
    and the first token and end of the request (``PickProgress``), batched every 50 ms."""

    def __init__(self, nc: Client, n: int) -> None:
        self.nc = nc
        self.ids = [f"{MODEL}-e{i:03d}" for i in range(n)]
        self.seq = dict.fromkeys(self.ids, 0)
        self.stored: dict[str, list[int]] = defaultdict(list)
        self.progress: list[tuple[float, str, str]] = []  # (due, kind, request id)

    async def loop(self) -> None:
        while True:
            t = time.time()
            stored, self.stored = self.stored, defaultdict(list)
            for eid, hashes in stored.items():
                batch = KVEventBatch(ts=t, events=[BlockStored(hashes, None, [], 16)])
                await self.nc.publish(subjects.engine_kv_events(eid), encode(
                    EngineKVEvents(instance_id=eid, model=MODEL, seq=self.seq[eid], batch=batch)))
                self.seq[eid] += 1
            due = [p for p in self.progress if p[0] <= t]
            if due:
                self.progress = [p for p in self.progress if p[0] > t]
                first = [rid for _, kind, rid in due if kind == "first"]
                done = [rid for _, kind, rid in due if kind == "done"]
                await self.nc.publish(subjects.PICK_PROGRESS, encode(PickProgress(first_token=first, finished=done)))
            await asyncio.sleep(REPORT_S)

    def placed(self, rid: str, endpoint: str, hashes: list[int], now: float) -> None:
        self.stored[endpoint] += hashes
        self.progress.append((now + FIRST_TOKEN_S, "first", rid))
        self.progress.append((now + FINISH_S, "done", rid))


def workload(args: argparse.Namespace, seed: int, n: int) -> list[tuple[str, bytes, list[int]]]:
    """(request id, encoded PickRequest, the prompt's block hashes) for ``n`` requests."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        tenant = rng.randrange(args.tenants)
        toks = [tenant * 1_000_003 % 100_000 + j for j in range(args.prefix_tokens)]
        toks += [rng.randrange(150_000) for _ in range(args.prompt_tokens - args.prefix_tokens)]
        rid = f"s{seed}-{i}"
        item = PickItem(request_id=rid, model=MODEL, token_ids=toks, tenant=f"t{tenant}")
        out.append((rid, encode(PickRequest(picks=[item])), chain_hashes(toks, 16)))
    return out


async def drive(nc: Client, engines: Engines, reqs: list[tuple[str, bytes, list[int]]], rate: float,
                lat: list[float] | None, counts: dict[str, int], reasons: dict[int, str]) -> float:
    """Send ``reqs`` open loop at ``rate``; returns the rate actually offered."""

    async def one(rid: str, payload: bytes, hashes: list[int]) -> None:
        t0 = time.perf_counter()
        try:
            msg = await nc.request(subjects.PICK, payload, timeout=REPLY_TIMEOUT_S)
        except Exception:
            counts["lost"] += 1
            return
        dt = time.perf_counter() - t0
        reply = decode(msg.data, PickReply)
        if reply.error or not reply.answers:
            counts["errors"] += 1
            return
        a = reply.answers[0]
        if a.code != 200:
            counts[f"refused_{a.code}"] += 1
            reasons.setdefault(a.code, a.reason)
        else:
            counts["picked"] += 1
            engines.placed(rid, a.endpoints[0], hashes, time.time())
        if lat is not None:
            lat.append(dt * 1e6)

    tasks = []
    start = time.perf_counter()
    for i, (rid, payload, hashes) in enumerate(reqs):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(rid, payload, hashes)))
    offered = len(reqs) / max(time.perf_counter() - start, 1e-9)
    await asyncio.gather(*tasks)
    return offered


async def wait_ready(nc: Client) -> None:
    probe = encode(PickRequest(picks=[PickItem(request_id="probe", model=MODEL, token_ids=[1])]))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            r = decode((await nc.request(subjects.PICK, probe, timeout=1)).data, PickReply)
            if r.answers and r.answers[0].code == 200:
                await nc.publish(subjects.PICK_PROGRESS, encode(PickProgress(finished=["probe"])))
                return
        except Exception:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError("the picker never answered with an endpoint")


async def run(args: argparse.Namespace, seed: int, admin_url: str, picker_url: str, tmp: Path) -> dict[str, Any]:
    log = (tmp / f"picker-{seed}.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.picker", "--seed", str(seed)], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "GANTRY_NATS_URL": picker_url})
    nc = await nats.connect(admin_url, pending_size=1 << 28)
    engines = Engines(nc, args.endpoints)
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    metrics = ctx.Process(target=report_metrics, args=(admin_url, engines.ids, seed, stop), daemon=True)
    metrics.start()
    reporter = asyncio.create_task(engines.loop())
    try:
        warm = workload(args, seed + 1000, int(args.rate * args.warmup))
        measured = workload(args, seed, int(args.rate * args.seconds))
        await wait_ready(nc)
        counts: dict[str, int] = defaultdict(int)
        reasons: dict[int, str] = {}
        await drive(nc, engines, warm, args.rate, None, counts, reasons)
        ps = psutil.Process(proc.pid)
        counts = defaultdict(int)
        lat: list[float] = []
        load0 = os.getloadavg()[0]
        c0 = ps.cpu_times()
        reasons = {}
        offered = await drive(nc, engines, measured, args.rate, lat, counts, reasons)
        c1 = ps.cpu_times()
        load1 = os.getloadavg()[0]
        cpu = (c1.user + c1.system) - (c0.user + c0.system)
        answered = sum(v for k, v in counts.items() if k != "lost")
        return {
            "seed": seed, "sent": len(measured), "answered": answered, "lost": counts["lost"],
            "picked": counts["picked"], "errors": counts["errors"],
            "refused": {k: v for k, v in counts.items() if k.startswith("refused_")}, "refusal_reasons": reasons,
            "offered_rate": round(offered, 1), "p50_us": pct(lat, 0.5), "p90_us": pct(lat, 0.9),
            "p99_us": pct(lat, 0.99), "max_us": max(lat, default=float("nan")),
            "picker_cpu_s": cpu, "picker_cpu_us_per_pick": cpu / max(answered, 1) * 1e6,
            "picker_cpu_share": cpu / args.seconds, "load_avg_start": load0, "load_avg_end": load1,
            "latencies_us": lat,
        }
    finally:
        reporter.cancel()
        stop.set()
        metrics.join(5)
        await nc.drain()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=1000.0, help="picks per second offered")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--endpoints", type=int, default=32)
    ap.add_argument("--tenants", type=int, default=100)
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--prefix-tokens", type=int, default=1024)
    args = ap.parse_args()
    if not 0 < args.prefix_tokens <= args.prompt_tokens:
        ap.error("--prefix-tokens must be in (0, --prompt-tokens]")
    creds = Credentials.generate()
    runs = []
    with tempfile.TemporaryDirectory(prefix="gantry-picker-bench-") as d:
        tmp = Path(d)
        server = start_nats(tmp / "nats", auth=creds)
        try:
            for seed in range(args.runs):
                r = uvloop.run(run(args, seed, server.url, creds.url(server.url, "picker"), tmp))
                runs.append(r)
                print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()
                                  if k != "latencies_us"}), flush=True)
        finally:
            server.stop()
    keys = ("p50_us", "p90_us", "p99_us", "max_us", "picker_cpu_us_per_pick", "picker_cpu_share", "offered_rate")
    summary = {
        "bench": "picker_service", "rate": args.rate, "seconds": args.seconds, "runs": args.runs,
        "endpoints": args.endpoints, "prompt_tokens": args.prompt_tokens,
        **{k: round(statistics.median(r[k] for r in runs), 1) for k in keys},
        "lost": sum(r["lost"] for r in runs), "errors": sum(r["errors"] for r in runs),
        "sent": sum(r["sent"] for r in runs),
        "load_avg": round(statistics.median(r["load_avg_end"] for r in runs), 2),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "picker_service.json").write_text(json.dumps({**summary, "detail": [
        {k: v for k, v in r.items() if k != "latencies_us"} for r in runs]}, indent=1))
    plot(runs, args)
    print(json.dumps(summary))


def plot(runs: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Reply-latency CDF of each run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        xs = sorted(x / 1000 for x in r["latencies_us"])
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.plot(xs, ys, label=f"run {r['seed']}: p99 {r['p99_us'] / 1000:.1f} ms, "
                f"{r['picker_cpu_us_per_pick']:.0f} µs CPU/pick, lost {r['lost']}")
    ax.set_xscale("log")
    ax.set_xlabel("reply latency (ms)")
    ax.set_ylabel("fraction of picks")
    ax.set_title(f"NATS picker: {args.rate:.0f} picks/s, {args.endpoints} endpoints, "
                 f"{args.prompt_tokens}-token prompts (shared machine)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT / "picker_service.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
