"""Packing quality on the Alibaba GPU trace (FGD methodology) and against CP-SAT optima.

    .venv/bin/python bench/packing.py            # the whole report, ~5 min on 2 cores
    .venv/bin/python bench/packing.py --quick    # a smoke run (one seed, a slice of the trace)

Prints one JSON line per (pod list, strategy), then a final line with the optimality summary; writes
docs/benchmarks/packing.json, packing.png, packing_optimality.png and packing.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from packing_lib import report
from packing_lib.baselines import BestFit, DotProduct, Policy, RandomFit
from packing_lib.core_policy import CorePolicy
from packing_lib.fragpolicy import FragmentationFit
from packing_lib.optimal import OptimalityRow, evaluate
from packing_lib.replay import replay
from packing_lib.trace import POD_LISTS, inflate, load_nodes, load_pods

from bench.progress import add_flag, progress
from shared.core.placement.scorers.fragmentation import HOST_WEIGHT

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
FAST_STRATEGIES = ("random", "best-fit", "dot-product", "fragmentation", "fragmentation-host", "gantry-default")
CORE_STRATEGIES = ("gantry-binpack", "gantry-spread")
OPT_STRATEGIES = ("binpack", "spread", "fragmentation")
# The paper's numbers at 130% arrived on the default pod list (unallocated GPUs of 6,212).
PAPER_AT_130 = {"fragmentation": 286, "best-fit": 430, "dot-product": 568, "random": 778}


def make_policy(strategy: str, seed: int, nodes: Any) -> Policy:
    """A fresh policy for one run."""
    if strategy == "random":
        return RandomFit(seed)
    if strategy == "best-fit":
        return BestFit(seed)
    if strategy == "dot-product":
        return DotProduct(seed)
    if strategy == "fragmentation":
        return FragmentationFit()  # FGD's measure alone (host_weight 0), the paper's policy
    if strategy == "fragmentation-host":
        return FragmentationFit(host_weight=HOST_WEIGHT)
    if strategy == "gantry-default":
        # The default profile's scorer with its own learning source (placed replicas + the request, the
        # 1,024 most recent), re-learnt every 256 arrivals instead of at every decision (see packing.md).
        return FragmentationFit(window=1024, relearn_every=256, core_view=True, host_weight=HOST_WEIGHT)
    return CorePolicy(strategy.removeprefix("gantry-"), nodes)


def run_trace(job: tuple[str, str, int, int | None]) -> dict[str, Any]:
    """One replay: (pod list, strategy, seed, optional pod limit)."""
    pod_list, strategy, seed, limit = job
    nodes = load_nodes()
    pods = inflate(load_pods(pod_list), 1000 * nodes.total_gpus, 1.3, seed)
    if limit is not None:
        pods = pods.take(np.arange(min(limit, len(pods))))
    policy = make_policy(strategy, seed, nodes)
    hook = None
    if isinstance(policy, CorePolicy):
        core = policy

        def hook(i: int) -> None:
            core.current_model = pods.names[i]

    start = time.perf_counter()
    curve = replay(nodes, pods, policy, hook)
    return {
        "trace": pod_list, "strategy": strategy, "seed": seed, "pods": len(pods),
        "seconds": round(time.perf_counter() - start, 2), "placed": curve.placed, "failed": curve.failed,
        "unallocated": [round(v, 2) for v in curve.unallocated],
        "allocated_share": [round(v, 5) for v in curve.allocated_share],
        "total_gpus": nodes.total_gpus,
    }


def run_optimality(job: tuple[int, bool]) -> OptimalityRow:
    """One small instance: (seed, mixed worker types?)."""
    seed, mixed = job
    return evaluate(seed, OPT_STRATEGIES, mixed=mixed)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (pod list, strategy): means over seeds at 100% and 130% arrived."""
    lines = []
    keys = sorted({(r["trace"], r["strategy"]) for r in runs},
                  key=lambda k: (POD_LISTS.index(k[0]), k[1]))
    for trace, strategy in keys:
        mine = [r for r in runs if r["trace"] == trace and r["strategy"] == strategy]
        at100 = [r["unallocated"][min(100, len(r["unallocated"]) - 1)] for r in mine]
        at130 = [r["unallocated"][-1] for r in mine]
        lines.append({
            "trace": trace, "strategy": strategy,
            "unallocated_gpus_at_100": round(float(np.mean(at100)), 1),
            "unallocated_gpus_at_130": round(float(np.mean(at130)), 1),
            "min_at_130": round(min(at130), 1), "max_at_130": round(max(at130), 1),
            "seeds": [r["seed"] for r in mine],
            "paper_at_130": PAPER_AT_130.get(strategy) if trace == "default" else None,
        })
    return lines


def optimality_summary(rows: list[OptimalityRow], family: str) -> dict[str, Any]:
    """Share of instances each strategy packs within one worker of the optimum, and more."""
    out: dict[str, Any] = {"family": family, "instances": len(rows),
                           "proven_optimal": sum(r.proven for r in rows)}
    within, exact, unplaced, extra = {}, {}, {}, {}
    for s in OPT_STRATEGIES:
        used = [(r.used[s], r.optimum) for r in rows]
        within[s] = round(sum(u is not None and u - o <= 1 for u, o in used) / len(rows), 3)
        exact[s] = round(sum(u is not None and u == o for u, o in used) / len(rows), 3)
        unplaced[s] = sum(u is None for u, _ in used)
        placed = [u - o for u, o in used if u is not None]
        extra[s] = round(float(np.mean(placed)), 2) if placed else None
    out.update(share_within_one_worker_of_optimal=within, share_optimal=exact,
               instances_with_unplaced_replicas=unplaced, mean_extra_workers_when_all_placed=extra)
    return out


def check(args: argparse.Namespace) -> None:
    """Replay only some pod lists and strategies (``--seeds`` seeds each) and print their summary lines."""
    pod_lists = args.pod_lists.split(",") if args.pod_lists else list(POD_LISTS)
    strategies = args.strategies.split(",") if args.strategies else [*CORE_STRATEGIES, *FAST_STRATEGIES]
    unknown = sorted(set(pod_lists) - set(POD_LISTS)) + sorted(set(strategies) - {*CORE_STRATEGIES, *FAST_STRATEGIES})
    if unknown:
        raise SystemExit(f"unknown pod list or strategy: {', '.join(unknown)}")
    limit = 600 if args.quick else None
    jobs = [(t, s, 42 + i, limit) for t in pod_lists for s in strategies for i in range(args.seeds)]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(run_trace, jobs))
    for line in summarize(runs):
        print(json.dumps(line), flush=True)


def main(argv: list[str] | None = None) -> None:
    """Run everything, print JSON lines, write the report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per (pod list, strategy) for fast strategies")
    parser.add_argument("--core-seeds", type=int, default=2, help="seeds for strategies run through place()")
    parser.add_argument("--instances", type=int, default=200, help="small instances for the CP-SAT check")
    parser.add_argument("--mixed-instances", type=int, default=100, help="extra instances with mixed workers")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 600 pods, 10 instances")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--report-only", action="store_true", help="rewrite packing.md and PNGs from packing.json")
    parser.add_argument("--pod-lists", help="comma-separated pod lists only (a check: prints, writes nothing)")
    parser.add_argument("--strategies", help="comma-separated strategies only (a check: prints, writes nothing)")
    add_flag(parser)
    args = parser.parse_args(argv)
    if args.pod_lists or args.strategies:
        check(args)
        return
    if args.report_only:
        report.write(json.loads((args.out / "packing.json").read_text()), args.out)
        return
    limit = 600 if args.quick else None
    seeds = [42 + i for i in range(1 if args.quick else args.seeds)]
    core_seeds = [42 + i for i in range(1 if args.quick else args.core_seeds)]
    n_inst = 10 if args.quick else args.instances
    n_mixed = 5 if args.quick else args.mixed_instances
    # Longest first: the runs through place() take ~15 s each, the fast ones 1-8 s.
    jobs = [(t, s, seed, limit) for t in POD_LISTS for s in CORE_STRATEGIES for seed in core_seeds]
    jobs += [(t, s, seed, limit) for t in POD_LISTS for s in FAST_STRATEGIES for seed in seeds]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        trace_futures = [pool.submit(run_trace, j) for j in jobs]
        opt_futures = [pool.submit(run_optimality, (s, False)) for s in range(n_inst)]
        mixed_futures = [pool.submit(run_optimality, (10_000 + s, True)) for s in range(n_mixed)]
        every = [*trace_futures, *opt_futures, *mixed_futures]
        for future in progress(every, len(every), "packing replays and optimality instances", args.progress):
            future.result()  # in submission order: a step is one result in
        runs = [f.result() for f in trace_futures]
        rows = [f.result() for f in opt_futures]
        mixed_rows = [f.result() for f in mixed_futures]
    lines = summarize(runs)
    for line in lines:
        print(json.dumps(line), flush=True)
    optimality = optimality_summary(rows, "one worker type per instance")
    mixed = optimality_summary(mixed_rows, "mixed worker types")
    elapsed = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"summary": lines, "runs": runs, "optimality": optimality, "optimality_mixed": mixed,
               "optimality_rows": [r.__dict__ for r in rows], "mixed_rows": [r.__dict__ for r in mixed_rows],
               "elapsed_seconds": elapsed, "quick": args.quick}
    if not args.quick:
        (args.out / "packing.json").write_text(json.dumps(payload, indent=1) + "\n")
        report.write(payload, args.out)
    print(json.dumps({"strategy": list(OPT_STRATEGIES),
                      "share_within_one_worker_of_optimal": optimality["share_within_one_worker_of_optimal"],
                      "instances": optimality["instances"], "proven_optimal": optimality["proven_optimal"],
                      "mixed_worker_types": mixed["share_within_one_worker_of_optimal"],
                      "elapsed_seconds": elapsed}), flush=True)


if __name__ == "__main__":
    main()
