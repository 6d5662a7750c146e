"""End-to-end placement benchmark: scale events in, instances committed, through the four services.

Starts a real nats-server (JetStream) and redis-server, the filter, fitting, scoring and reconciler
services (one process each, exactly as ``SERVICE_COMMANDS`` says) and an emulated fleet (default 1,000
workers × 8 H100-80GB GPUs), all on this machine. It then publishes scale events at a fixed offered rate
for a fixed time (each event raises one model's replicas by one, so one event = one placement) and
measures, from the reconciler's DecisionEvents:

- ``placements_per_s``: commits per second sustained at the target rate (commits between the first
  and the last, over that time: a stack falling behind stretches the window and shows less);
- ``p50_ms`` / ``p99_ms``: latency from the scale event entering JetStream to the instance being committed
  in the Redis ledger (the reconciler stamps it from the stream timestamp of the scale command);
- ``capacity_per_s``: commits per second when offered more than the stack can take (``--capacity-rate``),
  the most it sustains on this machine;
- ``cpu_ms_per_placement`` and ``bus_per_placement``: where the time goes, per process, and what one
  placement costs the bus (``--profile DIR`` adds py-spy stacks of every service); ``cpu_ms_total`` sums the
  processes, ``system_ms_per_placement`` is the kernel's share, ``msgs_per_placement`` the messages each
  process sent to and got from the server (its /connz), ``placements_per_batch`` how full each stage's pulled
  batches were (its /metrics): a stage's fixed cost per batch is paid that many times less per placement.

Phases per run: light load (latency without queueing), the target rate, then the capacity probe.
The emulated fleet and this driver run at a lower CPU priority (``nice`` 10; ``--same-priority`` turns
that off): they stand in for machines and clients that are not this one.

Run: ``.venv/bin/python bench/placement_e2e.py [--workers 1000] [--rate 500] [--seconds 10] [--runs 3]``.
Writes docs/benchmarks/placement_e2e.{json,png}; the last line printed is the JSON summary (medians over
runs). The machine is shared and has 2 cores: every process (NATS, Redis, four services, the fleet and
this driver) competes for them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import msgspec  # noqa: E402
import nats  # noqa: E402
import psutil  # noqa: E402
import uvloop  # noqa: E402

from bench.progress import add_flag, progress  # noqa: E402
from bench.results import save  # noqa: E402
from ops.servers import free_port  # noqa: E402
from ops.stack import WORKERS_SERVICE, LocalStack, WorkerFleet  # noqa: E402
from shared.bus import subjects  # noqa: E402
from shared.bus.messages import ScaleCommand, encode  # noqa: E402
from shared.bus.runtime import nats_options  # noqa: E402
from shared.core.placement.domain import GIB, Category, ModelSpec, PlacementStrategy  # noqa: E402
from shared.settings import Settings  # noqa: E402
from shared.state import StateStore  # noqa: E402

HARNESS_NICE = 10


class _Latency(msgspec.Struct):
    latency_ms: float


class _Decisions(msgspec.Struct):
    """The one field of DecisionEvents this driver reads: decoding whole decisions (breakdowns, names) cost the
    driver, a stand-in for clients that are not the stack, more CPU than the stack's own decode."""

    events: list[_Latency]


def spec(n: int) -> ModelSpec:
    """Small embedding models (many fit per GPU, so capacity never runs out during the run)."""
    return ModelSpec(
        name=f"bench{n}", source=f"bench/m{n}", weight_bytes=2 * GIB, categories=(Category.EMBEDDING,),
        placement_strategy=PlacementStrategy.BINPACK,
    )


async def wait_workers(store: StateStore, n: int, timeout: float) -> None:
    """Until ``n`` workers are registered in Redis."""
    deadline = time.monotonic() + timeout
    while len(await store.worker_names()) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(await store.worker_names())} of {n} workers registered")
        await asyncio.sleep(0.5)


async def one_run(args: argparse.Namespace, run: int) -> dict[str, float]:
    """Start everything, offer ``rate`` placements/s for ``seconds``, measure, tear down."""
    tmp = Path(tempfile.mkdtemp(prefix="gantry-bench-"))
    monitor = free_port()
    settings = Settings(
        nats_url=f"nats://127.0.0.1:{free_port()}", redis_url=f"redis://127.0.0.1:{free_port()}/0",
        js_storage="memory", heartbeat_interval_s=5.0,
    )
    fleet = WorkerFleet(count=args.workers, gpus=8, extra=("--start-delay", "0.05", "--download-delay", "0"))
    # The one way to start a stack (ops.stack), as `gantry up` does: servers, the four services, the fleet.
    stack = LocalStack(settings, fleet, home=tmp, nats_monitor_port=monitor, wait_ready=False, auth=not args.no_auth,
                       tls=args.tls)
    stack.start()
    assert stack.nats is not None and stack.redis is not None
    watched = {"nats": psutil.Process(stack.nats.process.pid), "redis": psutil.Process(stack.redis.process.pid),
               "driver": psutil.Process()}
    for child in stack.children:
        watched["fleet" if child.name == WORKERS_SERVICE else child.name] = psutil.Process(child.process.pid)

    def profile_services(phase: str, seconds: float) -> list[subprocess.Popen[bytes]]:
        """py-spy every Python process of the stack for the phase (``--profile DIR``): collapsed stacks."""
        if not args.profile:
            return []
        args.profile.mkdir(parents=True, exist_ok=True)
        spies = []
        for name, proc in watched.items():
            if name in ("nats", "redis", "driver"):
                continue
            out = args.profile / f"{phase}-{name}.txt"
            spy = str(Path(sys.executable).parent / "py-spy")
            # --gil: only samples holding the GIL (on CPU in Python); without it, idle waits in the event loop
            # and the metrics thread's select() are sampled as if they were work.
            cmd = [spy, "record", "--format", "raw", "--gil", "--nonblocking", "-r", "100", "-d", str(int(seconds)),
                   "-o", str(out),
                   "-p", str(proc.pid)]
            spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return spies

    def bus_counters() -> dict[str, int]:
        """The NATS server's message and byte counters (its /varz monitoring endpoint)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/varz", timeout=5) as resp:
            varz = json.load(resp)
        return {k: int(varz[k]) for k in ("in_msgs", "out_msgs", "in_bytes", "out_bytes")}

    def bus_by_process() -> dict[str, dict[str, int]]:
        """Messages each watched process sent (in) and received (out), from the server's /connz, its
        connections matched to processes by their local ports."""
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/connz?limit=1024", timeout=5) as resp:
            conns = json.load(resp)["connections"]
        owner: dict[int, str] = {}
        for name, proc in watched.items():
            if name in ("nats", "redis"):
                continue
            with contextlib.suppress(psutil.Error):
                for c in proc.net_connections(kind="tcp"):
                    if c.raddr and c.raddr.port == stack_nats_port:
                        owner[c.laddr.port] = name
        out: dict[str, dict[str, int]] = {}
        for c in conns:
            who = owner.get(int(c.get("port", 0)), "other")
            row = out.setdefault(who, {"in_msgs": 0, "out_msgs": 0, "in_bytes": 0, "out_bytes": 0})
            for k in row:
                row[k] += int(c.get(k, 0))
        return out

    def batches() -> dict[str, float]:
        """Pulled batches so far per service and subject (each service's gantry_batch_size_count)."""
        out: dict[str, float] = {}
        for name, port in stack.metrics_ports.items():
            with contextlib.suppress(OSError), urllib.request.urlopen(
                f"http://127.0.0.1:{port}/metrics", timeout=5
            ) as resp:
                for line in resp.read().decode().splitlines():
                    if line.startswith("gantry_batch_size_count{"):
                        subject = line.split('subject="', 1)[1].split('"', 1)[0]
                        out[f"{name}:{subject}"] = float(line.rsplit(" ", 1)[1])
        return out

    def cpu_seconds() -> dict[str, float]:
        out = {}
        for name, proc in watched.items():
            t = proc.cpu_times()
            out[name] = t.user + t.system
            out[f"{name}.sys"] = t.system
        return out

    stack_nats_port = int(settings.nats_url.rsplit(":", 1)[1])
    admin = stack.settings_for("admin")  # the driver stands in for the operator and reads everything
    store = StateStore.from_url(admin.redis_url)
    nc = await nats.connect(admin.nats_url, **nats_options(admin))
    try:
        await wait_workers(store, args.workers, 120)
        if not args.same_priority:
            # The fleet and this driver stand in for 1,000 machines and for clients that are not this
            # machine: they yield the CPU to the stack under test instead of competing with it.
            os.setpriority(os.PRIO_PROCESS, stack.child(WORKERS_SERVICE).process.pid, HARNESS_NICE)
            os.setpriority(os.PRIO_PROCESS, 0, HARNESS_NICE)
        await asyncio.sleep(args.warmup)

        latencies: list[float] = []
        commit_times: list[float] = []
        decisions = msgspec.json.Decoder(_Decisions)

        async def on_decision(msg: object) -> None:
            batch = decisions.decode(msg.data)  # type: ignore[attr-defined]
            now = time.monotonic()
            for ev in batch.events:
                latencies.append(ev.latency_ms)
                commit_times.append(now)

        await nc.subscribe(subjects.EVENT_DECISION, cb=on_decision)
        js = nc.jetstream()
        # Warm the pipeline (first-message costs: imports, JIT-less caches) outside the measurement.
        for n in range(args.models):
            await js.publish(subjects.SCALE, encode(ScaleCommand(model=f"bench{n}", replicas=1, spec=spec(n))),
                             headers={"Nats-Msg-Id": f"warm-{run}-{n}"})
        deadline = time.monotonic() + 60
        while len(latencies) < args.models and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        latencies.clear()
        commit_times.clear()

        replicas = [1] * args.models

        async def phase(name: str, rate: float, seconds: float) -> dict[str, object]:
            """Offer ``rate`` placements/s for ``seconds``; wait for the commits; summarise."""
            latencies.clear()
            commit_times.clear()
            total = int(rate * seconds)
            print(f"{name}: {total} placements offered at {rate}/s", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            bus0 = bus_counters()
            conn0 = bus_by_process()
            batches0 = batches()
            spies = profile_services(name, seconds)
            # CPU last, right before the first event: the reads above (every process's connection table, each
            # service's metrics) are the measurement's own work, not the stack's. The offered schedule still
            # starts at t0, as before (those reads take ~0.1 s: the first send catches up on it).
            cpu0 = cpu_seconds()
            sent = 0
            while sent < total:
                due = int((time.monotonic() - t0) * rate) + 1
                while sent < min(due, total):
                    n = sent % args.models
                    replicas[n] += 1
                    cmd = ScaleCommand(model=f"bench{n}", replicas=replicas[n])
                    msg_id = f"{name}-{run}-{sent}"
                    # Straight onto the stream's subject: JetStream stores it (deduped by the id) without a
                    # publish acknowledgement per event for this driver to wait on and pay for. Awaited in place:
                    # a publish only queues bytes for the connection's flusher (a task each cost the driver more).
                    await nc.publish(subjects.SCALE, encode(cmd), headers={"Nats-Msg-Id": msg_id})
                    sent += 1
                await asyncio.sleep(0.005)
            send_s = time.monotonic() - t0
            deadline = time.monotonic() + args.drain
            while len(latencies) < total and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            done = len(latencies)
            cpu1 = cpu_seconds()
            bus1 = bus_counters()
            conn1 = bus_by_process()
            batches1 = batches()
            for spy in spies:
                spy.wait()
            # CPU milliseconds each process spent per placement: where the time goes, by process.
            cpu_ms = {k: round((cpu1[k] - cpu0[k]) * 1000.0 / max(done, 1), 3) for k in cpu0 if "." not in k}
            # The kernel's share (system time: sockets, wake-ups), per process.
            sys_ms = {k[:-4]: round((cpu1[k] - cpu0[k]) * 1000.0 / max(done, 1), 3) for k in cpu0 if "." in k}
            # Decisions arrive in batches that share one arrival time: the first batch opens the window
            # and does not count in it.
            first = commit_times.count(commit_times[0]) if commit_times else 0
            window = commit_times[-1] - commit_times[0] if done > first else 0.0
            lat = sorted(latencies)
            return {
                "offered_per_s": rate,
                "send_s": round(send_s, 3),
                "placements": done,
                "expected": total,
                "placements_per_s": round((done - first) / window, 1) if window > 0 else float("nan"),
                "p50_ms": round(lat[len(lat) // 2], 2) if lat else float("nan"),
                "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2) if lat else float("nan"),
                "cpu_ms_per_placement": cpu_ms,
                "cpu_ms_total": round(sum(cpu_ms.values()), 3),
                "system_ms_per_placement": sys_ms,
                # NATS traffic per placement: how many messages (and bytes) one placement costs the bus.
                "bus_per_placement": {k: round((bus1[k] - bus0[k]) / max(done, 1), 1) for k in bus0},
                # Messages each process sent to (in) and got from (out) the server per placement.
                "msgs_per_placement": {
                    who: [round((row["in_msgs"] - conn0.get(who, {}).get("in_msgs", 0)) / max(done, 1), 2),
                          round((row["out_msgs"] - conn0.get(who, {}).get("out_msgs", 0)) / max(done, 1), 2)]
                    for who, row in sorted(conn1.items())
                },
                # Placements per pulled batch, per stage: fewer, fuller batches cost less per placement.
                "placements_per_batch": {
                    k: round(done / (v - batches0.get(k, 0.0)), 2) for k, v in sorted(batches1.items())
                    if v > batches0.get(k, 0.0)
                },
                "latencies": lat,
            }

        light = await phase("light", args.light_rate, args.light_seconds)
        full = await phase("target", args.rate, args.seconds)
        capacity = await phase("capacity", args.capacity_rate, args.capacity_seconds) if args.capacity_seconds else {}
        result: dict[str, object] = {
            "run": run,
            **{k: v for k, v in full.items() if k != "latencies"},
            "capacity_per_s": capacity.get("placements_per_s", float("nan")),
            "light_load": {k: v for k, v in light.items() if k != "latencies"},
            "overbooked": len(await store.overbooked()),
            "latencies": full["latencies"],
            "light_latencies": light["latencies"],
        }
        return result
    finally:
        await nc.close()
        await store.close()
        stack.stop(timeout=10)
        if not args.keep:  # servers' data and the services' logs: a run leaves nothing behind unless asked
            shutil.rmtree(tmp, ignore_errors=True)


def plot(runs: list[dict[str, object]], path: Path) -> None:
    """Latency CDF of each run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in runs:
        light = r.get("light_load") or {}
        for key, label, style in (
            ("light_latencies", f"run {r['run']}, light load ({light.get('offered_per_s')}/s offered)", "--"),
            ("latencies", f"run {r['run']}, {r['offered_per_s']}/s offered: {r['placements_per_s']}/s placed", "-"),
        ):
            lat = r.get(key) or []
            if lat:
                ys = [i / len(lat) for i in range(len(lat))]
                ax.plot(lat, ys, style, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("scale event → committed (ms)")
    ax.set_ylabel("fraction of placements")
    ax.set_title("End-to-end placement latency (4 services, NATS, Redis, emulated fleet)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through one_run's cleanup (servers and services are stopped)


def main() -> None:
    """Run the benchmark and write docs/benchmarks/placement_e2e.{json,png}."""
    signal.signal(signal.SIGTERM, _terminate)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=1000)
    p.add_argument("--models", type=int, default=50)
    p.add_argument("--rate", type=float, default=500.0, help="offered scale events per second (the target)")
    p.add_argument("--light-rate", type=float, default=25.0, help="offered rate of the light-load phase")
    p.add_argument("--light-seconds", type=float, default=8.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--capacity-rate", type=float, default=1500.0, help="offered rate of the capacity probe")
    p.add_argument("--capacity-seconds", type=float, default=5.0, help="0: no capacity probe")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--drain", type=float, default=30.0, help="longest wait for the last commits after sending")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--no-auth", action="store_true", help="servers without identities (to measure what auth costs)")
    p.add_argument("--tls", action="store_true", help="NATS over TLS (gantry up --tls)")
    p.add_argument("--same-priority", action="store_true",
                   help="run the fleet and the driver at the services' CPU priority (default: lower)")
    p.add_argument("--keep", action="store_true", help="keep each run's directory (servers' data, services' logs)")
    p.add_argument("--profile", type=Path, default=None, help="write py-spy collapsed stacks per process here")
    add_flag(p)
    args = p.parse_args()
    runs = []
    for run in progress(range(args.runs), args.runs, "placement_e2e runs", args.progress):
        r = uvloop.run(one_run(args, run))
        print(json.dumps({k: v for k, v in r.items() if "latencies" not in k}), flush=True)
        runs.append(r)
    summary = {
        "workers": args.workers,
        "gpus_per_worker": 8,
        "offered_per_s": args.rate,
        "seconds": args.seconds,
        "runs": args.runs,
        "placements_per_s": statistics.median(float(r["placements_per_s"]) for r in runs),
        "capacity_per_s": statistics.median(float(r["capacity_per_s"]) for r in runs),  # type: ignore[arg-type]
        "p50_ms": statistics.median(float(r["p50_ms"]) for r in runs),
        "p99_ms": statistics.median(float(r["p99_ms"]) for r in runs),
        "light_load": {
            "offered_per_s": args.light_rate,
            "p50_ms": statistics.median(float(r["light_load"]["p50_ms"]) for r in runs),  # type: ignore[index]
            "p99_ms": statistics.median(float(r["light_load"]["p99_ms"]) for r in runs),  # type: ignore[index]
        },
        "overbooked_gpus": max(int(r["overbooked"]) for r in runs),
        "per_run": [{k: v for k, v in r.items() if "latencies" not in k} for r in runs],
    }
    if not args.no_write:
        save("placement_e2e", summary, lambda png: plot(runs, png))
    print(json.dumps({k: v for k, v in summary.items() if k != "per_run"}))


if __name__ == "__main__":
    main()
