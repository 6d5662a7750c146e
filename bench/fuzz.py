"""Fuzz bench: every subject Gantry consumes, ``--per-subject`` hostile payloads each (default 10,000).

Starts a real stack through ``ops.stack.LocalStack`` (NATS, Redis, the four services, an emulated fleet),
places one replica, then publishes hostile payloads on every consumed subject (``bench.adversary.fuzz``:
malformed bytes, and valid messages of this cluster with one field made hostile), waits until every durable
consumer has drained, and checks: every process alive, no service busy while idle (CPU share over 3 s),
nothing of the fuzz stored in Redis (the junk checker), and a valid scale afterwards converging (seconds).

Run: ``.venv/bin/python bench/fuzz.py [--per-subject 10000] [--seed 0]``. Writes docs/benchmarks/fuzz.{json,png};
the last line printed is the JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import msgspec  # noqa: E402
import nats  # noqa: E402
from nats.aio.client import Client  # noqa: E402

from bench.adversary.fuzz import cpu_share, drained, draw, junk, payloads, publish_all, targets  # noqa: E402
from bench.progress import Progress, add_flag  # noqa: E402
from bench.results import save  # noqa: E402
from ops.servers import free_port  # noqa: E402
from ops.stack import WORKERS_SERVICE, LocalStack, WorkerFleet  # noqa: E402
from shared.bus import streams, subjects  # noqa: E402
from shared.bus.messages import ErrorEvent, ScaleCommand, encode  # noqa: E402
from shared.core.placement.domain import GIB, InstanceState, ModelSpec  # noqa: E402
from shared.settings import Settings  # noqa: E402
from shared.state import StateStore  # noqa: E402

MODEL = ModelSpec(name="fz", source="x/fz", weight_bytes=8 * GIB)
WORKERS = 2
CONSUMERS = [(stream, durable) for stream, durable, _ in streams.ALL_CONSUMERS]


async def running(store: StateStore, n: int) -> bool:
    """``n`` replicas of the model, all RUNNING."""
    insts = await store.instances(MODEL.name)
    return len(insts) == n and all(i.state is InstanceState.RUNNING for i in insts)


async def until(check: object, timeout: float) -> float | None:
    """Seconds until ``check()`` holds, or None after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if await check():  # type: ignore[operator]
            return time.monotonic() - t0
        await asyncio.sleep(0.05)
    return None


async def scale(nc: Client, replicas: int, tag: str) -> None:
    """A valid scale command on JetStream."""
    cmd = ScaleCommand(model=MODEL.name, replicas=replicas, spec=MODEL)
    await nc.jetstream().publish(subjects.SCALE, encode(cmd), headers={"Nats-Msg-Id": tag})


async def run(args: argparse.Namespace) -> dict[str, object]:
    """Start, fuzz, check, stop."""
    home = Path(tempfile.mkdtemp(prefix="gantry-fuzz-"))
    settings = Settings(
        nats_url=f"nats://127.0.0.1:{free_port()}", redis_url=f"redis://127.0.0.1:{free_port()}/0",
        js_storage="memory", heartbeat_interval_s=0.5, not_ready_after_s=3.0, reschedule_after_s=5.0,
        ack_wait_s=2.0, reconcile_interval_s=0.25,
    )
    fleet = WorkerFleet(count=WORKERS, gpus=2, extra=("--heartbeat-interval", "0.5"))
    stack = LocalStack(settings, fleet, home=home, wait_ready=False)
    stack.start()
    admin = stack.settings_for("admin")  # the harness injects what no service identity may (auth is on)
    store = StateStore.from_url(admin.redis_url)
    nc = await nats.connect(admin.nats_url)
    rejected: Counter[str] = Counter()

    async def on_dead(msg: object) -> None:
        rejected[msgspec.json.decode(msg.data, type=ErrorEvent).subject.split(".")[-1]] += 1  # type: ignore[attr-defined]

    try:
        await nc.subscribe(subjects.DEAD_LETTER_ALL, cb=on_dead)
        if await until(lambda: _registered(store), 60) is None:
            raise SystemExit("workers did not register")
        await scale(nc, 1, "fuzz-first")
        if await until(lambda: running(store, 1), 60) is None:
            raise SystemExit("the first replica did not run")
        (inst,) = await store.instances(MODEL.name)
        assert inst.worker is not None
        per_subject: dict[str, dict[str, float]] = {}
        subjects_ = targets(inst.worker, MODEL, inst)
        bar = Progress(len(subjects_), "fuzz subjects", force=args.progress)
        for n, target in enumerate(subjects_):
            bar.show(target.subject)
            t0 = time.monotonic()
            bodies = draw(payloads(target), args.per_subject, seed=args.seed * 1000 + n)
            t1 = time.monotonic()
            sent = await publish_all(nc, target, bodies, tag=f"{args.seed}-{n}")
            ok = await drained(nc, CONSUMERS, timeout=600)
            bar.step(target.subject)
            per_subject[target.subject] = {
                "payloads": len(bodies), "mbytes": round(sent / 1e6, 2), "draw_s": round(t1 - t0, 2),
                "handled_s": round(time.monotonic() - t1, 2), "drained": ok,
            }
            print(f"{target.subject}: {per_subject[target.subject]}", file=sys.stderr, flush=True)
        await asyncio.sleep(1.0)
        alive = {c.name: c.alive() for c in stack.children}
        alive.update(nats=stack.nats is not None and stack.nats.alive(),
                     redis=stack.redis is not None and stack.redis.alive())
        services = {c.name: c.process.pid for c in stack.children if c.name != WORKERS_SERVICE}
        idle_cpu = cpu_share(services, 3.0)
        workers = {f"w{i}" for i in range(WORKERS)}
        found = await junk(store, workers, {MODEL.name})
        for _ in range(50):  # bookkeeping of messages still in flight is pruned by the next ticks: wait 5 s
            if not found:
                break
            await asyncio.sleep(0.1)
            found = await junk(store, workers, {MODEL.name})
        await scale(nc, 2, "fuzz-after")
        converge_s = await until(lambda: running(store, 2), 30)
        return {
            "per_subject_payloads": args.per_subject, "subjects": len(per_subject), "seed": args.seed,
            "crashed": sorted(name for name, up in alive.items() if not up),
            "junk": found[:20], "junk_count": len(found), "idle_cpu_cores": idle_cpu,
            "max_idle_cpu_cores": max(idle_cpu.values()), "converge_after_s": converge_s,
            "dead_letters": dict(rejected), "per_subject": per_subject,
        }
    finally:
        await nc.close()
        await store.close()
        stack.stop(timeout=10)


async def _registered(store: StateStore) -> bool:
    return len(await store.worker_names()) >= WORKERS


def plot(result: dict[str, object], path: Path) -> None:
    """Handling time per subject (bars), annotated with payload counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = result["per_subject"]
    assert isinstance(per, dict)
    names = [s.replace("gantry.", "") for s in per]
    fig, ax = plt.subplots(figsize=(10, 5))
    ax.barh(names, [v["handled_s"] for v in per.values()], color="tab:blue")
    ax.set_xlabel("seconds to publish and drain")
    ax.set_title(f"fuzz: {result['per_subject_payloads']} hostile payloads per subject; "
                 f"crashed {len(result['crashed'])}, junk {result['junk_count']}, "  # type: ignore[arg-type]
                 f"valid scale after: {result['converge_after_s']} s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    """Parse flags, run, write the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-subject", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true")
    add_flag(p)
    args = p.parse_args()
    t0 = time.monotonic()
    result = asyncio.run(run(args))
    result["wall_s"] = round(time.monotonic() - t0, 1)
    if not args.no_write:
        save("fuzz", result, lambda png: plot(result, png))
    summary = {k: result[k] for k in ("per_subject_payloads", "subjects", "crashed", "junk_count",
                                      "max_idle_cpu_cores", "converge_after_s", "wall_s")}
    dead = result["dead_letters"]
    summary["dead_letters"] = sum(dead.values()) if isinstance(dead, dict) else 0
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
