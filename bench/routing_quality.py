"""Routing quality in virtual time: the routing core's profiles against round robin on the engine emulator.

Routers: ``rr`` (round robin), ``least`` (fewest outstanding requests, fresh engine state), and the
routing core (``gantry simulate --router gantry:PROFILE``) with ``power-of-two`` (best of two random
endpoints by the router's in-flight count), ``approx-prefix`` (GIE v1.2 weights, the router's
assumed-state prefix index), ``precise-prefix`` (the same weights on the engines' KV events) and
``default`` (Gantry's: sticky-until-saturated affinity gate on the hybrid index, the GPU-model latency
predictor, queue / KV / no-hit-LRU scorers).

Workloads (Llama-3.1-8B on H100-SXM replicas, roofline step model, KV events on):

- ``mooncake``: the Mooncake FAST'25 synthetic trace (``../shared/data/mooncake``; 512-token prefix block
  ids), arrivals compressed by ``--mooncake-scale`` so round robin queues;
- ``shared-prefix``: many tenants (llm-d's b2b-saas shape, smaller): ``--tenants`` tenants, each with a
  6,144-token system prompt (12 units of 512), a 1,024-token unique question and 256 output tokens,
  Poisson arrivals at ``--rate`` req/s, tenants drawn uniformly (seeded).

Figures per router and workload: TTFT p50/p90/p99, ITL p50/p90, throughput, goodput at an SLO (TTFT ≤ 2 s
and mean ITL ≤ 50 ms; refused and unfinished requests count as failures), prefix-cache hit rate (engine
side: cached prompt tokens / prompt tokens), per-endpoint balance (coefficient of variation of
requests and busy time) and requests lost (offered − completed − refused with a reason).

``--trace FILE --workloads trace`` replays a trace file instead (a gateway capture, Mooncake JSONL).

``--router-replicas N`` puts N independent gantry routers (HA gateway replicas) round robin in front.

Run: ``.venv/bin/python bench/routing_quality.py [--quick]``. Writes docs/benchmarks/routing_quality.{json,png};
the last line printed is the JSON summary. Virtual time is deterministic; wall time is reported only as
simulation speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.progress import add_flag, progress  # noqa: E402
from ops.cli.simulate import build_cluster  # noqa: E402
from shared.core.sim import TraceRequest, make_router, simulate  # noqa: E402
from shared.core.sim.gantry import GantryRouter  # noqa: E402
from shared.traces import load_trace  # noqa: E402

OUT = REPO / "docs" / "benchmarks"
ROUTERS = ("rr", "least", "gantry:power-of-two", "gantry:approx-prefix", "gantry:precise-prefix", "gantry:default")
SLO_TTFT_S, SLO_ITL_S = 2.0, 0.05


def shared_prefix(tenants: int, rate: float, n: int, seed: int) -> list[TraceRequest]:
    """Poisson arrivals; each request = its tenant's 12 prefix units + 2 unique units."""
    rng = random.Random(seed)
    t = 0.0
    out = []
    for i in range(n):
        t += rng.expovariate(rate)
        tenant = rng.randrange(tenants)
        ids = (*(tenant * 100 + u for u in range(12)), 10_000_000 + 2 * i, 10_000_001 + 2 * i)
        out.append(TraceRequest(t, 7168, 256, prefix_ids=ids, prefix_unit=512))
    return out


def run(router: str, trace: list[TraceRequest], replicas: int, router_replicas: int,
        router_seed: int = 0) -> dict[str, Any]:
    """One simulation; the figures above. ``router_seed`` seeds the gantry routers' tie-breaks."""
    spec = build_cluster("llama-3.1-8b", "H100-SXM-80GB", replicas, router=router,
                         router_replicas=router_replicas if router.startswith("gantry") else 1)
    if router_seed and router.startswith("gantry"):
        profile = router.partition(":")[2] or "default"
        spec = dataclasses.replace(spec, router=lambda: GantryRouter(profile, seed=router_seed,
                                                                     replicas=router_replicas))
    t0 = time.perf_counter()
    res = simulate(trace, spec)
    wall = time.perf_counter() - t0
    s = res.summary()
    done = [r for r in res.requests if r.finish_time >= 0]
    good = sum(1 for r in done if r.ttft <= SLO_TTFT_S and r.mean_itl <= SLO_ITL_S)
    per_ep = [0] * replicas
    for k in res.assignment:
        per_ep[k] += 1
    busy = [e.stats.busy_s for e in res.engines]

    def cv(xs: list[float]) -> float:
        m = statistics.fmean(xs)
        return statistics.pstdev(xs) / m if m else 0.0

    offered = len(trace)
    out: dict[str, Any] = {
        "router": router,
        "offered": offered,
        "completed": len(done),
        "refused": len(res.rejected),
        "lost": offered - len(done) - len(res.rejected),
        "ttft_s": s["ttft_s"],
        "itl_s": s["itl_s"],
        "throughput": s["throughput"],
        "goodput": {"fraction": good / offered, "requests_per_s": good / float(s["makespan_s"])},  # type: ignore[arg-type]
        "prefix_cache_hit_rate": s["prefix_cache_hit_rate"],
        "balance": {"requests_cv": cv([float(x) for x in per_ep]), "busy_cv": cv(busy),
                    "requests_max_over_mean": max(per_ep) / statistics.fmean(per_ep)},
        "preemptions": s["preemptions"],
        "sim_wall_s": wall,
    }
    if isinstance(res.router, GantryRouter):
        out["refusal_reasons"] = sorted({reason for _, reason in res.rejected})[:3]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--router-replicas", type=int, default=1, help="gantry routers (HA gateways), round robin")
    ap.add_argument("--mooncake-scale", type=float, default=3.0)
    ap.add_argument("--tenants", type=int, default=400)
    ap.add_argument("--rate", type=float, default=44.0)
    ap.add_argument("--out", default=None, help="file stem under docs/benchmarks (default routing_quality, "
                    "or routing_quality_Nrouters)")
    ap.add_argument("--router-seed", type=int, default=0, help="seed of the gantry routers' random tie-breaks")
    ap.add_argument("--seed", type=int, default=1, help="seed of the shared-prefix workload's arrivals and tenants")
    ap.add_argument("--routers", default=",".join(ROUTERS))
    ap.add_argument("--workloads", default="mooncake,shared-prefix")
    ap.add_argument("--trace", default=None, help="a trace file (e.g. captured by the gateway's --capture): "
                    "replayed as the workload 'trace' (add it to --workloads)")
    ap.add_argument("--requests", type=int, default=4000, help="requests per workload (Mooncake has 3,993)")
    add_flag(ap)
    args = ap.parse_args()
    n = 600 if args.quick else args.requests
    workloads = {
        "mooncake": lambda: load_trace("mooncake", args.mooncake_scale, limit=n),
        "shared-prefix": lambda: shared_prefix(args.tenants, args.rate, n, seed=args.seed),
    }
    if args.trace:
        workloads["trace"] = lambda: load_trace(args.trace, limit=n)
    unknown = [w for w in args.workloads.split(",") if w not in workloads]
    if unknown:
        ap.error(f"unknown workloads {unknown} (known: {', '.join(workloads)}; 'trace' needs --trace)")
    results: dict[str, dict[str, Any]] = {}
    names = args.workloads.split(",")
    for wl in progress(names, len(names), "routing_quality workloads", args.progress):
        trace = workloads[wl]()
        results[wl] = {}
        for router in args.routers.split(","):
            make_router(router)  # fail fast on a bad name
            r = run(router, trace, args.replicas, args.router_replicas, args.router_seed)
            results[wl][router] = r
            print(json.dumps({"workload": wl, "router": router, "ttft_p50": round(r["ttft_s"]["p50"], 3),
                              "ttft_p90": round(r["ttft_s"]["p90"], 3), "ttft_p99": round(r["ttft_s"]["p99"], 3),
                              "hit": round(r["prefix_cache_hit_rate"], 3),
                              "goodput": round(r["goodput"]["fraction"], 3),
                              "refused": r["refused"], "lost": r["lost"], "busy_cv": round(r["balance"]["busy_cv"], 3),
                              "wall_s": round(r["sim_wall_s"], 1)}), flush=True)
    summary = summarize(results, args)
    OUT.mkdir(parents=True, exist_ok=True)
    stem = args.out or ("routing_quality" if args.router_replicas == 1
                        else f"routing_quality_{args.router_replicas}routers")
    (OUT / f"{stem}.json").write_text(json.dumps({**summary, "detail": results}, indent=1))
    plot(results, OUT / f"{stem}.png")
    print(json.dumps(summary))


def summarize(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """The Done-when checks per workload."""
    checks: dict[str, Any] = {}
    for wl, rs in results.items():
        if not {"rr", "gantry:default"} <= set(rs):
            continue
        rr, d = rs["rr"], rs["gantry:default"]
        c: dict[str, Any] = {
            "ttft_p90_rr_s": rr["ttft_s"]["p90"], "ttft_p90_default_s": d["ttft_s"]["p90"],
            "ttft_p90_ratio": d["ttft_s"]["p90"] / rr["ttft_s"]["p90"] if rr["ttft_s"]["p90"] else 0.0,
            "lost": {r: v["lost"] for r, v in rs.items()},
        }
        c["ttft_p90_at_most_half_of_rr"] = c["ttft_p90_ratio"] <= 0.5
        if "gantry:approx-prefix" in rs:
            a = rs["gantry:approx-prefix"]
            c["hit_default"], c["hit_approx"] = d["prefix_cache_hit_rate"], a["prefix_cache_hit_rate"]
            c["default_hit_above_approx"] = d["prefix_cache_hit_rate"] > a["prefix_cache_hit_rate"]
            if "gantry:precise-prefix" in rs:
                p = rs["gantry:precise-prefix"]
                c["precise_at_least_approx"] = (p["prefix_cache_hit_rate"] >= a["prefix_cache_hit_rate"]
                                                and p["ttft_s"]["p90"] <= a["ttft_s"]["p90"])
        checks[wl] = c
    return {"bench": "routing_quality", "replicas": args.replicas, "router_replicas": args.router_replicas,
            "requests": args.requests, "mooncake_scale": args.mooncake_scale,
            "tenants": args.tenants, "rate": args.rate, "seed": args.seed, "router_seed": args.router_seed,
            "slo": {"ttft_s": SLO_TTFT_S, "itl_s": SLO_ITL_S},
            "checks": checks,
            "table": {wl: {r: {"ttft_p90": v["ttft_s"]["p90"], "hit": v["prefix_cache_hit_rate"],
                               "goodput": v["goodput"]["fraction"]} for r, v in rs.items()}
                      for wl, rs in results.items()}}


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Per workload: TTFT p50/p90/p99 (log), prefix hit rate and goodput per router."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wls = list(results)
    fig, axes = plt.subplots(len(wls), 3, figsize=(15, 4 * len(wls)), squeeze=False)
    for row, wl in enumerate(wls):
        rs = results[wl]
        names = [r.replace("gantry:", "") for r in rs]
        x = range(len(names))
        ax = axes[row][0]
        for j, q in enumerate(("p50", "p90", "p99")):
            ax.bar([i + (j - 1) * 0.27 for i in x], [max(v["ttft_s"][q], 1e-3) for v in rs.values()], 0.27, label=q)
        ax.set_yscale("log")
        ax.set_ylabel("TTFT (s)")
        ax.set_title(f"{wl}: TTFT")
        ax.legend(fontsize=8)
        axes[row][1].bar(x, [v["prefix_cache_hit_rate"] for v in rs.values()], color="C2")
        axes[row][1].set_title(f"{wl}: prefix-cache hit rate")
        axes[row][2].bar(x, [v["goodput"]["fraction"] for v in rs.values()], color="C3")
        axes[row][2].set_title(f"{wl}: goodput (TTFT ≤ {SLO_TTFT_S:g} s, ITL ≤ {SLO_ITL_S * 1000:g} ms)")
        for ax in axes[row]:
            ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
