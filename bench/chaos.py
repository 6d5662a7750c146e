"""Chaos bench: ``--rounds`` rounds (default 10) of random scale bursts and cordons while NATS, Redis and every
placement service are killed with SIGKILL at random moments and restarted, with the invariant checker of
``bench.adversary.chaos`` over the whole history.

Per round and in total: scale commands sent and acknowledged, kills per component, ledger samples, acknowledged
commands lost, samples with a GPU over capacity, samples with the ledger out of step with the instances, and
whether (and how fast) the cluster settled afterwards: every replica RUNNING, or PENDING only when no worker has
room, within ``--quiesce`` seconds (30).

Run: ``.venv/bin/python bench/chaos.py [--rounds 10] [--round-seconds 20] [--seed 0]``. Writes
docs/benchmarks/chaos.{json,png}; the last line printed is the JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.adversary.chaos import ChaosConfig, RoundResult, run_chaos  # noqa: E402
from bench.progress import Progress, add_flag  # noqa: E402
from bench.results import save  # noqa: E402
from ops.servers import free_port  # noqa: E402


def totals(results: list[RoundResult], cfg: ChaosConfig) -> dict[str, object]:
    """The run's figures summed over rounds."""
    kills: dict[str, int] = {}
    for r in results:
        for component, n in r.kills.items():
            kills[component] = kills.get(component, 0) + n
    settled = [r.quiesced_s for r in results if r.quiesced_s is not None]
    return {
        "rounds": len(results), "round_s": cfg.round_s, "quiesce_limit_s": cfg.quiesce_s, "seed": cfg.seed,
        "workers": cfg.workers, "gpus_per_worker": cfg.gpus,
        "commands": sum(r.commands for r in results), "acked": sum(r.acked for r in results),
        "kills": kills, "ledger_samples": sum(r.samples for r in results),
        "acked_lost": sum(len(r.lost_commands) for r in results),
        "overbooked_samples": sum(len(r.overbooked) for r in results),
        "ledger_mismatch_samples": sum(len(r.ledger_mismatch) for r in results),
        "rounds_settled": len(settled), "rounds_not_settled": len(results) - len(settled),
        "pending_with_room_rounds": sum(1 for r in results if r.pending_with_room),
        "settle_s_max": max(settled) if settled else None,
        "settle_s_median": sorted(settled)[len(settled) // 2] if settled else None,
    }


def plot(results: list[RoundResult], path: Path, limit: float) -> None:
    """Seconds to settle per round (a red bar at the limit: not settled), with the kills of each round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    xs = [r.round for r in results]
    ys = [r.quiesced_s if r.quiesced_s is not None else limit for r in results]
    colors = ["tab:green" if r.quiesced_s is not None else "tab:red" for r in results]
    ax.bar(xs, ys, color=colors)
    ax.axhline(limit, color="grey", linestyle="--", linewidth=1)
    for r, y in zip(results, ys, strict=True):
        ax.text(r.round, y, f"{r.acked} acked\n{sum(r.kills.values())} kills", ha="center", va="bottom", fontsize=7)
    ax.set_xlabel("round")
    ax.set_ylabel("seconds to settle after the round (red: not settled)")
    lost = sum(len(r.lost_commands) for r in results)
    over = sum(len(r.overbooked) for r in results)
    ax.set_title(f"chaos: kill -9 of NATS, Redis and every service each round; lost {lost}, over capacity {over}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    """Parse flags, run, write the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--round-seconds", type=float, default=20.0)
    p.add_argument("--quiesce", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--gpus", type=int, default=4)
    p.add_argument("--no-write", action="store_true")
    add_flag(p)
    args = p.parse_args()
    cfg = ChaosConfig(workers=args.workers, gpus=args.gpus, round_s=args.round_seconds, quiesce_s=args.quiesce,
                      seed=args.seed)
    home = Path(tempfile.mkdtemp(prefix="gantry-chaos-"))
    t0 = time.monotonic()
    bar = Progress(args.rounds, "chaos rounds", force=args.progress)
    bar.show("starting the stack")
    results = asyncio.run(run_chaos(home, cfg, args.rounds, free_port(), free_port(),
                                    on_round=lambda n: bar.step(f"round {n} done")))
    summary = totals(results, cfg)
    summary["wall_s"] = round(time.monotonic() - t0, 1)
    for r in results:
        print(json.dumps(r.summary()), file=sys.stderr)
    if not args.no_write:
        save("chaos", {"summary": summary, "rounds": [r.summary() for r in results]},
             lambda png: plot(results, png, cfg.quiesce_s))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
