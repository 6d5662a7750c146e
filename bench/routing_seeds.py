"""Precise vs approximate prefix routing over several tie-break seeds, in virtual time.

One run of ``bench/routing_quality.py`` compares the two profiles on a single seed. Their TTFT p90 differ by
a fraction of a percent, and the max-score picker's random tie-break alone moves one profile's p90 by about
±1 % on the Mooncake trace (which endpoint a long prompt collides on is chaotic), so a single run says
little about which index is better. This bench runs both profiles with router seeds ``0..K-1`` on the same
workloads as ``routing_quality.py`` (Mooncake ×3, 400 tenants at 44 req/s; 8 × Llama-3.1-8B on H100) and
compares medians over the seeds (and counts the seeds each profile wins): TTFT p90, prefix-cache hit rate,
TTFT p99 and goodput.

Run: ``.venv/bin/python bench/routing_seeds.py [--seeds 9] [--quick]``. Writes
docs/benchmarks/routing_seeds.{json,png}; the last line printed is the JSON summary. Virtual time is
deterministic: the same command gives the same figures on any machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.progress import add_flag, progress  # noqa: E402
from bench.results import save  # noqa: E402
from bench.routing_quality import run, shared_prefix  # noqa: E402
from shared.traces import load_trace  # noqa: E402

PROFILES = ("gantry:approx-prefix", "gantry:precise-prefix")
FIGURES = ("ttft_p90", "hit", "ttft_p99", "goodput")


def figures(r: dict[str, Any]) -> dict[str, float]:
    """The compared figures of one run."""
    return {"ttft_p90": r["ttft_s"]["p90"], "hit": r["prefix_cache_hit_rate"], "ttft_p99": r["ttft_s"]["p99"],
            "goodput": r["goodput"]["fraction"], "lost": r["lost"]}


def compare(runs: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Medians per profile, seeds where precise is at least as good, and the check."""
    a, p = runs[PROFILES[0]], runs[PROFILES[1]]
    med = {prof: {f: statistics.median(r[f] for r in rs) for f in FIGURES} for prof, rs in runs.items()}
    lower_better = {"ttft_p90": True, "ttft_p99": True, "hit": False, "goodput": False}
    wins = {f: sum(1 for x, y in zip(a, p, strict=True) if (y[f] <= x[f] if lower_better[f] else y[f] >= x[f]))
            for f in FIGURES}
    ma, mp = med[PROFILES[0]], med[PROFILES[1]]
    return {"median": med, "precise_at_least_as_good_in_seeds": wins, "seeds": len(a),
            "lost": sum(r["lost"] for rs in runs.values() for r in rs),
            "precise_at_least_approx_median": mp["ttft_p90"] <= ma["ttft_p90"] and mp["hit"] >= ma["hit"]}


def main() -> None:
    """Run the sweep, print one JSON line per run and the summary last."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=9, help="router seeds 0..N-1")
    ap.add_argument("--quick", action="store_true", help="600 requests per workload, 3 seeds (a smoke run)")
    ap.add_argument("--workloads", default="mooncake,shared-prefix")
    ap.add_argument("--no-write", action="store_true", help="print only")
    add_flag(ap)
    args = ap.parse_args()
    n, seeds = (600, 3) if args.quick else (4000, args.seeds)
    if seeds < 1:
        ap.error("--seeds must be >= 1")
    loaders = {"mooncake": lambda: load_trace("mooncake", 3.0, limit=n),
               "shared-prefix": lambda: shared_prefix(400, 44.0, n, seed=1)}
    names = args.workloads.split(",")
    unknown = [w for w in names if w not in loaders]
    if unknown:
        ap.error(f"unknown workloads {unknown} (known: {', '.join(loaders)})")
    detail: dict[str, dict[str, list[dict[str, float]]]] = {}
    for wl in progress(names, len(names), "routing_seeds workloads", args.progress):
        trace = loaders[wl]()
        detail[wl] = {prof: [] for prof in PROFILES}
        for seed in range(seeds):
            for prof in PROFILES:
                f = figures(run(prof, trace, 8, 1, seed))
                detail[wl][prof].append(f)
                print(json.dumps({"workload": wl, "router": prof, "router_seed": seed,
                                  **{k: round(v, 4) for k, v in f.items()}}), flush=True)
    summary = {"bench": "routing_seeds", "requests": n, "seeds": seeds,
               "checks": {wl: compare(runs) for wl, runs in detail.items()}}
    if not args.no_write:
        save("routing_seeds", {**summary, "detail": detail}, lambda png: plot(detail, png))
    print(json.dumps(summary))


def plot(detail: dict[str, dict[str, list[dict[str, float]]]], path: Path) -> None:
    """Per workload: TTFT p90 and hit rate of both profiles by seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(detail), 2, figsize=(12, 3.6 * len(detail)), squeeze=False)
    for row, (wl, runs) in enumerate(detail.items()):
        for col, (f, label) in enumerate((("ttft_p90", "TTFT p90 (s)"), ("hit", "prefix-cache hit rate"))):
            ax = axes[row][col]
            for prof, rs in runs.items():
                ax.plot(range(len(rs)), [r[f] for r in rs], "o-", label=prof.removeprefix("gantry:"))
            ax.set_xlabel("router seed")
            ax.set_title(f"{wl}: {label}")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
