"""Placement-core decision latency on synthetic clusters (10, 100, 1,000 workers × 8 × 80 GiB GPUs).

Cases: a 7B single-GPU model and a 70B tensor-parallel-4 model, under spread, binpack and auto (the default), on a
cluster with seeded random existing allocations (other models' instances, external VRAM use, cordoned
GPUs, stale workers). Each decision is timed in-process (wall and thread CPU time); between decisions the
chosen replica is committed and removed again, so the snapshot's incremental updates run as in a service.
Two more rows keep every replica (``between_decisions: kept``): the cluster fills and the default's learned
workload moves with each decision, so its kept state is refreshed as in a busy service.
Every case is measured in several runs; the reported p50/p99 are the medians over runs.

Run: ``.venv/bin/python bench/placement_core.py [--quick]``. Prints one JSON line per case and a final
JSON summary line; writes docs/benchmarks/placement_core.json and .png.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shared.catalog import load_model_arch  # noqa: E402
from shared.core.placement import ClusterSnapshot, instance_from_decision, place, requirements  # noqa: E402
from shared.core.placement.domain import (  # noqa: E402
    GIB,
    Decision,
    Gpu,
    Instance,
    InstanceState,
    ModelSpec,
    PlacementStrategy,
    ResourceRequest,
    Worker,
)

NOW = 10_000.0
OUT = REPO / "docs" / "benchmarks"
SIZES = (10, 100, 1000)
CASES = {
    "7b-single-gpu": ("llama-2-7b", ()),
    "70b-tp4": ("llama-3.1-70b", ("--tensor-parallel-size=4",)),
}
TARGET_P50_US, TARGET_P99_US = 1000.0, 3000.0
# The default strategy's decision before issue 19 (binpack), as this bench recorded it at 00072e6 (load ~2-3).
BASELINE = {
    "7b-single-gpu": {"strategy": "binpack", "p50_us": 279.4, "cpu_p50_us": 280.9, "commit": "00072e6"},
    "70b-tp4": {"strategy": "binpack", "p50_us": 990.7, "cpu_p50_us": 994.3, "commit": "00072e6"},
}


def cluster(workers: int, seed: int) -> ClusterSnapshot:
    """Seeded random cluster: ~45 % of GPUs hold another model, some external use, a few cordons."""
    rng = random.Random(seed)
    snap = ClusterSnapshot()
    instances: list[Instance] = []
    for w in range(workers):
        name = f"node-{w:04d}"
        gpus = []
        for i in range(8):
            external = rng.choice([0, 0, 0, 0, 2, 6]) * GIB
            gpus.append(Gpu(index=i, product="H100-SXM-80GB", vram_total=80 * GIB, vram_used=external,
                            schedulable=rng.random() > 0.01))
            if rng.random() < 0.45:
                claim = rng.choice([8, 16, 24, 40, 72]) * GIB
                instances.append(Instance(id=f"{name}-{i}", model=f"other-{rng.randrange(30)}",
                                          state=InstanceState.RUNNING, worker=name, gpu_indexes=(i,),
                                          vram_claims=(claim,), ram_claim=rng.choice([0, 8]) * GIB))
        stale = rng.random() < 0.02
        snap.upsert_worker(Worker(name=name, gpus=tuple(gpus), ram_total=1024 * GIB, ram_used=64 * GIB,
                                  last_heartbeat=NOW - (60.0 if stale else rng.uniform(0, 4))))
    for inst in instances:
        snap.upsert_instance(inst)
    return snap


def pct(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    k = max(0, min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def measure(snap: ClusterSnapshot, model: ModelSpec, req: ResourceRequest, n: int, exhaustive: bool,
            keep: bool = False, tag: str = "") -> tuple[list[float], list[float], str]:
    """Wall and CPU seconds of ``n`` decisions; each chosen replica is committed then removed (untimed), or
    committed and kept (``keep``: the cluster fills and the learned workload moves with every decision)."""
    walls, cpus = [], []
    where = ""
    for k in range(n):
        c0, t0 = time.thread_time(), time.perf_counter()
        result = place(snap, model, NOW, request=req, exhaustive=exhaustive)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.thread_time() - c0)
        if isinstance(result, Decision):
            where = f"{result.candidate.worker}:{list(result.candidate.gpu_indexes)}"
            snap.upsert_instance(instance_from_decision(result, f"bench-{tag}{k}", created_at=NOW + k))
            if not keep:
                snap.remove_instance(f"bench-{tag}{k}")
        else:
            where = "unschedulable"
    return walls, cpus, where


def run_case(workers: int, case: str, strategy: str, runs: int, n: int, exhaustive: bool, keep: bool = False
             ) -> dict[str, Any]:
    """Median over ``runs`` of the per-run percentiles."""
    model_name, params = CASES[case]
    model = ModelSpec(name=model_name, backend_parameters=params, placement_strategy=PlacementStrategy(strategy))
    req = requirements(model, load_model_arch(model_name))
    assert isinstance(req, ResourceRequest)
    per_run = []
    where = ""
    for r in range(runs):
        snap = cluster(workers, seed=1000 * workers + r)
        gc.collect()
        gc.freeze()  # the snapshot is long-lived state: keep it out of collections, as a service would
        measure(snap, model, req, max(3, n // 20), exhaustive, keep, "warm-")  # warm-up
        walls, cpus, where = measure(snap, model, req, n, exhaustive, keep)
        gc.unfreeze()
        walls.sort()
        cpus.sort()
        per_run.append({"p50": pct(walls, 0.5), "p99": pct(walls, 0.99), "cpu_p50": pct(cpus, 0.5),
                        "cpu_p99": pct(cpus, 0.99)})
    med = {k: statistics.median(run[k] for run in per_run) * 1e6 for k in per_run[0]}
    return {
        "workers": workers, "gpus": workers * 8, "case": case, "strategy": strategy,
        "path": "reference" if exhaustive else "fast",
        "between_decisions": "kept" if keep else "undone",
        "p50_us": round(med["p50"], 1), "p99_us": round(med["p99"], 1),
        "cpu_p50_us": round(med["cpu_p50"], 1), "cpu_p99_us": round(med["cpu_p99"], 1),
        "runs": runs, "decisions_per_run": n, "last_choice": where,
        "loadavg_1m": round(os.getloadavg()[0], 2),  # wall tails on a shared machine follow the load
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """p50 and p99 vs cluster size, one line per case/strategy/path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), sharey=True)
    titles = {"p50_us": "wall p50", "p99_us": "wall p99", "cpu_p99_us": "thread CPU-time p99"}
    for ax, key in zip(axes, titles, strict=True):
        series: dict[str, list[tuple[int, float]]] = {}
        for row in rows:
            label = f"{row['case']} {row['strategy']}" + (" (reference path)" if row["path"] == "reference" else "")
            series.setdefault(label, []).append((row["workers"], row[key]))
        for label, points in sorted(series.items()):
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, [y / 1000 for y in ys], marker="o", linestyle="--" if "reference" in label else "-",
                    label=label)
        ax.axhline((TARGET_P50_US if key == "p50_us" else TARGET_P99_US) / 1000, color="red", linewidth=0.8,
                   linestyle=":", label="target")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("workers (× 8 GPUs)")
        ax.set_title(f"decision {titles[key]} (median of runs)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("milliseconds per decision")
    axes[2].legend(fontsize=7)
    load = max(r.get("loadavg_1m", 0.0) for r in rows)
    fig.suptitle(f"placement core, 2-core shared machine (1-min load average up to {load:.1f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    """Run every case and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs and decisions (a smoke test)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    runs = 2 if args.quick else args.runs
    n = 60 if args.quick else 400
    load_before = os.getloadavg()[0]
    rows = []
    for workers in SIZES:
        for case in CASES:
            for strategy in ("spread", "binpack", "auto"):  # auto: the default (fragmentation, issue 19)
                row = run_case(workers, case, strategy, runs, n, exhaustive=False)
                rows.append(row)
                print(json.dumps(row), flush=True)
    for case in CASES:  # the default strategy when every replica stays: the learned workload moves each time
        row = run_case(1000, case, "auto", runs, n, exhaustive=False, keep=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
    for workers in (10, 100, 1000):  # the plain reference path, for comparison (fewer decisions)
        row = run_case(workers, "7b-single-gpu", "spread", min(runs, 3), 10 if workers == 1000 else 30, exhaustive=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
    big = [r for r in rows if r["workers"] == 1000 and r["case"] == "7b-single-gpu" and r["path"] == "fast"]
    summary = {
        "bench": "placement_core",
        "target": {"workers": 1000, "case": "7b-single-gpu", "p50_us": TARGET_P50_US, "p99_us": TARGET_P99_US},
        "target_met": all(r["p50_us"] <= TARGET_P50_US and r["p99_us"] <= TARGET_P99_US for r in big),
        # wall-clock tails include time the process spent preempted by other work on the machine
        "target_met_on_cpu_time": all(
            r["cpu_p50_us"] <= TARGET_P50_US and r["cpu_p99_us"] <= TARGET_P99_US for r in big
        ),
        "at_1000_workers": {
            f"{r['case']}/{r['strategy']}" + ("/kept" if r["between_decisions"] == "kept" else ""):
            {k: r[k] for k in ("p50_us", "p99_us", "cpu_p50_us", "cpu_p99_us")}
            for r in rows if r["workers"] == 1000 and r["path"] == "fast"
        },
        # issue 19: the default (auto) within 10 % of the default before it (binpack), same 1,000-worker cases
        "baseline": BASELINE,
        "default_vs_baseline_p50": {
            r["case"]: round(r["p50_us"] / BASELINE[r["case"]]["p50_us"], 3)
            for r in rows if r["workers"] == 1000 and r["path"] == "fast" and r["strategy"] == "auto"
            and r["between_decisions"] == "undone"
        },
        "loadavg_1m_before": round(load_before, 2),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "runs": runs,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.quick:
        (OUT / "placement_core.json").write_text(json.dumps({"summary": summary, "cases": rows}, indent=2) + "\n")
        plot(rows, OUT / "placement_core.png")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
