"""Plots and the Markdown report of bench/packing.py (regenerated entirely by that one command)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from .trace import POD_LISTS, VRAM_GIB

COLORS = {"random": "tab:gray", "dot-product": "tab:orange", "best-fit": "tab:blue",
          "fragmentation": "tab:green", "fragmentation-host": "tab:olive", "gantry-default": "tab:red",
          "gantry-binpack": "tab:purple", "gantry-spread": "tab:brown"}
GANTRY = ("gantry-default", "fragmentation-host", "fragmentation", "gantry-binpack", "gantry-spread")
FGD_TARGET = 270  # issue 19: the best Gantry strategy at 130% on `default` (FGD paper: 286)


def _mean_curve(runs: list[dict[str, Any]], key: str) -> Any:
    width = min(len(r[key]) for r in runs)
    return np.mean([r[key][:width] for r in runs], axis=0)


def plot_curves(payload: dict[str, Any], path: Path) -> None:
    """Unallocated GPUs vs arrived workload, one panel per pod list, one line per strategy."""
    runs = payload["runs"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    for ax, trace in zip(axes.ravel(), POD_LISTS, strict=True):
        for strategy in COLORS:
            mine = [r for r in runs if r["trace"] == trace and r["strategy"] == strategy]
            if not mine:
                continue
            y = _mean_curve(mine, "unallocated")
            ax.plot(np.arange(len(y)), y, label=f"{strategy} ({len(mine)} seeds)", color=COLORS[strategy])
        ax.set_title(f"{trace}")
        ax.set_ylabel("unallocated GPUs")
        ax.set_ylim(0, 1300)
        ax.set_xlim(80, 130)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("arrived workload (% of cluster GPU capacity)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Alibaba GPU trace (6,212 GPUs): unallocated GPUs as workload arrives (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_list(payload: dict[str, Any], trace: str, path: Path) -> None:
    """One pod list: unallocated GPUs vs arrived workload, mean over seeds, one line per strategy."""
    runs = [r for r in payload["runs"] if r["trace"] == trace]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for strategy in COLORS:
        mine = [r for r in runs if r["strategy"] == strategy]
        if mine:
            y = _mean_curve(mine, "unallocated")
            ax.plot(np.arange(len(y)), y, label=f"{strategy} ({len(mine)} seeds): {y[-1]:.0f}",
                    color=COLORS[strategy], linewidth=2.2 if strategy == "gantry-default" else 1.2)
    ax.set_xlim(90, 130)
    ax.set_ylim(0, 1100)
    ax.set_xlabel("arrived workload (% of cluster GPU capacity)")
    ax.set_ylabel("unallocated GPUs (of 6,212)")
    ax.set_title(f"pod list {trace}: unallocated GPUs (lower is better; value at 130% in the legend)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_allocation(payload: dict[str, Any], path: Path) -> None:
    """Allocated share vs arrived workload on the default pod list."""
    runs = [r for r in payload["runs"] if r["trace"] == "default"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy in COLORS:
        mine = [r for r in runs if r["strategy"] == strategy]
        if mine:
            y = 100 * _mean_curve(mine, "allocated_share")
            ax.plot(np.arange(len(y)), y, label=strategy, color=COLORS[strategy])
    ax.plot([0, 100], [0, 100], ":", color="black", lw=0.8)
    ax.set_xlabel("arrived workload (% of GPU capacity)")
    ax.set_ylabel("GPU capacity allocated (%)")
    ax.set_title("default pod list: allocation ratio")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_optimality(payload: dict[str, Any], path: Path) -> None:
    """Histogram of extra workers beyond the CP-SAT optimum, per strategy."""
    rows = payload["optimality_rows"]
    strategies = list(payload["optimality"]["share_within_one_worker_of_optimal"])
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = ["0", "1", "2", "3+", "unplaced"]
    width = 0.8 / len(strategies)
    for k, s in enumerate(strategies):
        counts = [0] * len(bins)
        for r in rows:
            used = r["used"][s]
            idx = 4 if used is None else min(used - r["optimum"], 3)
            counts[max(idx, 0)] += 1
        ax.bar(np.arange(len(bins)) + k * width, counts, width, label=s)
    ax.set_xticks(np.arange(len(bins)) + width, bins)
    ax.set_xlabel("extra workers beyond the optimum")
    ax.set_ylabel("instances")
    ax.set_title(f"{len(rows)} small instances (one worker type each) vs CP-SAT")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(payload: dict[str, Any]) -> str:
    out = ["| pod list | strategy | unallocated @100% | unallocated @130% (mean) | min–max @130% | seeds "
           "| paper @130% |", "|---|---|---:|---:|---:|---:|---:|"]
    for line in payload["summary"]:
        paper = line["paper_at_130"] if line["paper_at_130"] is not None else ""
        out.append(f"| {line['trace']} | {line['strategy']} | {line['unallocated_gpus_at_100']:.1f} | "
                   f"{line['unallocated_gpus_at_130']:.1f} | {line['min_at_130']:.0f}–{line['max_at_130']:.0f} | "
                   f"{len(line['seeds'])} | {paper} |")
    return "\n".join(out)


def _opt_table(summary: dict[str, Any]) -> str:
    out = ["| strategy | within one worker of optimal | optimal | instances with an unplaced replica | "
           "mean extra workers (all placed) |", "|---|---:|---:|---:|---:|"]
    for s, share in summary["share_within_one_worker_of_optimal"].items():
        out.append(f"| {s} | {100 * share:.1f}% | {100 * summary['share_optimal'][s]:.1f}% | "
                   f"{summary['instances_with_unplaced_replicas'][s]} | "
                   f"{summary['mean_extra_workers_when_all_placed'][s]} |")
    return "\n".join(out)


def checks(payload: dict[str, Any]) -> list[str]:
    """The issue's acceptance points, evaluated on this run's numbers."""
    at130 = {(x["trace"], x["strategy"]): x["unallocated_gpus_at_130"] for x in payload["summary"]}

    def mark(ok: bool) -> str:
        return "holds" if ok else "does NOT hold"

    d = {s: at130.get(("default", s)) for s in ("random", "dot-product", "best-fit", "fragmentation")}
    out = []
    if all(v is not None for v in d.values()):
        order = d["random"] > d["dot-product"] > d["best-fit"]
        out.append(f"- Published ordering on `default` (random worst; best fit better than dot product): "
                   f"{mark(order)} (random {d['random']:.0f}, dot product {d['dot-product']:.0f}, best fit "
                   f"{d['best-fit']:.0f}, fragmentation {d['fragmentation']:.0f}; paper 778 / 568 / 430 / 286).")
        out.append(f"- Fragmentation ≤ 300 unallocated GPUs at 130% on `default`: "
                   f"{mark(d['fragmentation'] <= 300)} ({d['fragmentation']:.1f}, mean of the seeds).")
    for trace in POD_LISTS[1:]:
        f, b = at130.get((trace, "fragmentation")), at130.get((trace, "best-fit"))
        if f is not None and b is not None:
            out.append(f"- Fragmentation beats best fit on `{trace}`: {mark(f < b)} ({f:.1f} vs {b:.1f}).")
    for trace in POD_LISTS:
        g, b = at130.get((trace, "gantry-default")), at130.get((trace, "best-fit"))
        if g is not None and b is not None:
            out.append(f"- Issue 19 (2): the default profile strands no more GPUs than best fit on `{trace}`: "
                       f"{mark(g <= b)} ({g:.1f} vs {b:.1f}).")
    for trace in POD_LISTS:
        mine = {s: at130[(trace, s)] for s in GANTRY if (trace, s) in at130}
        b = at130.get((trace, "best-fit"))
        if mine and b is not None:
            best = min(mine, key=mine.__getitem__)
            extra = ""
            if trace == "default":
                fgd = at130.get(("default", "fragmentation"))
                extra = f", ≤ {FGD_TARGET}: {mark(mine[best] <= FGD_TARGET)}; FGD's measure alone {fgd:.1f}"
            out.append(f"- Issue 19 (3): best Gantry strategy on `{trace}` is `{best}` with {mine[best]:.1f}; "
                       f"better than best fit ({b:.1f}): {mark(mine[best] < b)}{extra}.")
    share = payload["optimality"]["share_within_one_worker_of_optimal"].get("binpack")
    if share is not None:
        out.append(f"- Gantry binpack within one worker of the optimum on ≥ 95% of the small instances: "
                   f"{mark(share >= 0.95)} ({100 * share:.1f}%).")
    out.append(f"- One command regenerates the report: this run took {payload['elapsed_seconds']:.0f} s.")
    return out


def paper_row(payload: dict[str, Any]) -> dict[str, float]:
    """Our means at 130% on ``default`` for the strategies the paper reports."""
    at130 = {x["strategy"]: x["unallocated_gpus_at_130"] for x in payload["summary"] if x["trace"] == "default"}
    keys = {"bf": "best-fit", "dp": "dot-product", "rnd": "random", "fg": "fragmentation"}
    return {k: float(at130.get(v, float("nan"))) for k, v in keys.items()}


def write(payload: dict[str, Any], out: Path) -> None:
    """Write the PNGs and packing.md."""
    plot_curves(payload, out / "packing.png")
    for trace in POD_LISTS:
        plot_list(payload, trace, out / f"packing_{trace}.png")
    plot_allocation(payload, out / "packing_allocation.png")
    plot_optimality(payload, out / "packing_optimality.png")
    seconds = {}
    for r in payload["runs"]:
        seconds.setdefault(r["strategy"], []).append(r["seconds"])
    timing = ", ".join(f"{s} {np.median(v):.1f} s" for s, v in sorted(seconds.items()))
    vram = ", ".join(f"{k} {v} GiB" for k, v in VRAM_GIB.items())
    opt, mixed = payload["optimality"], payload["optimality_mixed"]
    text = TEMPLATE.format(
        table=_table(payload), opt_table=_opt_table(opt), mixed_table=_opt_table(mixed),
        n=opt["instances"], proven=opt["proven_optimal"], n_mixed=mixed["instances"],
        proven_mixed=mixed["proven_optimal"], elapsed=payload["elapsed_seconds"], timing=timing, vram=vram,
        checks="\n".join(checks(payload)), note=payload.get("note", ""), **paper_row(payload),
    )
    (out / "packing.md").write_text(text)


TEMPLATE = """# Packing quality: Alibaba GPU trace and CP-SAT optima

Generated by `.venv/bin/python bench/packing.py` (the whole report: JSON, PNGs and this page; it took
{elapsed} s on the shared 2-core machine, two worker processes). Raw numbers: `packing.json`.
{note}

## Acceptance checks (computed from this run)

{checks}

## What is measured

**Trace.** `../shared/data/alibaba_gpu_v2023` ("openb", the trace of the FGD paper: Weng et al., *Beware of
Fragmentation: Scheduling GPU-Sharing Workloads with Fragmentation Gradient Descent*, USENIX ATC'23).
Cluster: all 1,523 nodes of `openb_node_list_all_node.csv` (1,213 GPU nodes with 6,212 GPUs, and 310
CPU-only nodes), each with its CPU, memory and GPUs. Pod lists: `default`, `gpushare40`, `multigpu20`,
`gpuspec10`.

**Replay (the paper's methodology, as its simulator's run scripts do it).** For each seed: the pod list
plus pods drawn from it with replacement until the total GPU demand reaches 130% of the cluster's
capacity, shuffled (`tune 1.3`, `shuffle-pod`). Pods are submitted one by one, no departures; a pod that
fits nowhere is skipped and counted as failed. *Arrived workload* = GPU demand of the submitted pods
(placed or not) over capacity. **Unallocated GPUs** = capacity − GPU demand of the placed pods, in GPUs
(`gpu_milli × num_gpu / 1000` summed), read the first time arrived workload reaches 100% and 130%; this
is how the paper's analysis scripts compute the allocation ratio (`used_gpu_milli / total`). It counts
every idle GPU share, fragmented or not: at 130% arrived, almost all of it is stranded capacity.

**Mapping to Gantry.** A node is a worker: its GPUs (product = trace GPU type; VRAM per type: {vram};
G1/G2/G3 are undisclosed, the values are placeholders and do not affect the results, because every
claim is a fraction of the GPU it lands on), RAM = node memory, CPU = node CPU (milli-cores, Gantry's
`Worker.cpu_total`). A pod is a replica: `num_gpu` GPUs on one worker, each claiming `gpu_milli/1000` of
that GPU's VRAM (whole-GPU pods claim whole GPUs; Gantry's utilisation-style claim), RAM = pod memory,
CPU = pod CPU (`cpu_claim`). A `gpu_spec` is a GPU-type constraint. **CPU and memory are
respected**, as in the paper's simulator (its Kubernetes resource filter checks CPU and memory; its
policies score CPU and GPU). CPU-only pods (`num_gpu = 0`) are replayed too: they take CPU and memory.

**Strategies.**
- `random`, `best-fit`, `dot-product`: the paper's baselines as its simulator scores them (integer node
  scores 0–100, uniform choice among the top nodes; best fit = least `0.5·cpu_left/max_cpu +
  0.5·gpu_left/max_gpu`; dot product of free and requested (CPU, GPU), smallest wins); a sharing pod goes
  to the fullest GPU that fits it.
- `fragmentation`: FGD's measure alone (the scorer with `host_weight: 0`), the paper's policy as Gantry
  runs it. The core scorer `shared/core/placement/scorers/fragmentation.py` (FGD's idea): the
  candidate with the smallest increase of its node's *expected fragmentation* with respect to the workload
  distribution, ties by worker name then GPU index (the core's rule). The workload is **learned online**
  from the pods that arrived so far (sliding window of the last 4,096 requests, re-learned at 1, 2, 4,
  ... 512 arrivals, then every 1,024), not given in advance as the paper's simulator does. Each shape is
  (GPU count, milli-GPU per GPU, CPU and memory, allowed GPU types). The replay calls the plugin's own
  kernels (`fragmentation_increase`) and caches each node's best candidate per pod shape until that node
  changes. Inside Gantry the plugin learns from the snapshot's 1,024 most recent instances plus the
  request and re-learns at every decision; that exact rule (`FragmentationFit.like_core()`) is held
  decision-for-decision equal to `place()` with the `fragmentation` profile by
  `tests/unit/bench/test_fragmentation_fast_path.py`. Re-learning every 1,024 arrivals instead of at
  every decision is what makes a 10,000-pod replay take seconds; on `default` re-learning every 256
  arrivals gave the same result within seed noise (a side experiment, not rerun here: 285 vs 284 GPUs, 7 seeds).
- `fragmentation-host`: the same with the scorer's default `host_weight` (0.5): the expected fragmentation
  plus 0.5 × the node's *host-stranded GPUs*, free GPU capacity beyond what its free CPU and RAM can back
  at the workload's mean CPU and RAM per GPU (`max(0, free GPUs − minₕ host_freeₕ / per_gpuₕ)`). FGD sees
  CPU only through whether each shape still fits a node; on this trace half of the CPU-only pods landed
  on GPU nodes with FGD (730 of 1,461 on `default`, seed 42, 306 of them on nodes with free GPU capacity),
  and at 130% ~70 of FGD's 288 unallocated GPUs sat on nodes whose CPU or memory no shape could use any
  more. Tetris (Grandl et al., SIGCOMM'14) aligns demand and free vectors to avoid exactly this; the term
  here measures the same loss in GPUs so it adds to FGD's. Weights 0.3 and 1.0 gave the same result within
  seed noise (default pod list, seeds 42 and 43: 256/257 and 257/254); tie-break variants we also tried
  (best fit, dot product, fullest node, fullest GPU, whole-history or GPU-demand-weighted workloads, an
  eventual-waste lookahead per GPU) did not beat FGD's 288.
- `gantry-default`: the **default profile** (models that name no placement strategy get `auto`, i.e. the
  `fragmentation` scorer with `host_weight` 0.5, plus `locality` and `worker_fill`, which score 0 on the
  trace). It uses the plugin's own learning source (the 1,024 most recent placed replicas plus the request,
  CPU and RAM as host demands, no GPU-type constraint) but re-learns every 256 arrivals instead of at
  every decision: through `place()` a decision takes ~0.15 s here (thousands of distinct (CPU, memory)
  shapes in the trace), far too slow for 12 replays. `FragmentationFit.like_core()` (re-learning at every
  decision) is held decision-for-decision equal to `place()` with the default profile by
  `tests/unit/bench/test_fragmentation_fast_path.py`.
- `gantry-binpack`, `gantry-spread`: GPUStack's strategies, as a model naming them gets them: every
  decision is `shared.core.placement.place()` on a `ClusterSnapshot` updated incrementally (one
  `upsert_instance` per placed pod), with the profile's `placement` scorer (+ `worker_fill` for binpack).
  CPU and memory are the core's own fit checks; only multi-type `gpu_spec` constraints need a bench-only
  filter plugin, `trace_host`. A pod drawn twice is two replicas of one model (this matters for spread).

## Results: unallocated GPUs (of 6,212; lower is better)

{table}

![unallocated GPUs vs arrived workload](packing.png)

One plot per pod list:

![default](packing_default.png)

![gpushare40](packing_gpushare40.png)

![multigpu20](packing_multigpu20.png)

![gpuspec10](packing_gpuspec10.png)

![allocation ratio, default pod list](packing_allocation.png)

**Against the paper.** Our baselines strand fewer GPUs than the paper reports for them (best fit
{bf:.0f} here vs 430, dot product {dp:.0f} vs 568, random {rnd:.0f} vs 778), while the fragmentation
strategy lands near the paper's FGD ({fg:.0f} vs 286). Simulator details we could not match exactly
move the absolute numbers by tens of GPUs: the GPU a sharing pod gets under each baseline, the
simulator's other default Kubernetes score plugins, its exact inflation sampler, and the integer score
rounding we copied but may not match everywhere. What the replay reproduces is the ordering and the size
of the gaps. Gantry's own `binpack` (spec §6 formula: the fullest *GPU* by VRAM and RAM ratio) and
`spread` ignore CPU, which this trace is often short of, and do not keep whole GPUs free for multi-GPU
pods. Both strand more GPUs than best fit here; that is why the default is no longer either of them.

Median seconds per replay run: {timing}.

## Optimality: small instances against CP-SAT

{n} random instances, each 2–8 workers of one type (a node pool: 1, 2 or 4 GPUs of L4 24 GiB, L40S 48 GiB or
H100 80 GiB; 64 GiB RAM per GPU) and 5–30 replicas: half fractional models (1 GPU, 5–60% of its VRAM,
2–16 GiB RAM), half LLM replicas on 1, 2 or 4 whole GPUs (90% of each). Replicas are generated into a hidden
packing, so every instance is feasible. OR-Tools CP-SAT finds the fewest workers that host all replicas
(3 s limit per instance; {proven} of {n} proven optimal, the others compared against the proven lower
bound, which can only make a strategy look worse). Each strategy places the replicas one after another
with `place()` (online, in arrival order, as the reconciler does), on the instance's workers plus **one
spare worker** of the same type, named to sort last. The optimum never needs the spare; a strategy that
cannot place every replica even with it needs more than optimum + 1 workers, so "within one worker of
the optimum" is decided exactly; such instances are counted in the "unplaced" column.

{opt_table}

![extra workers](packing_optimality.png)

Second family, {n_mixed} instances where every worker draws its own type and GPU count ({proven_mixed}
proven optimal; no spare worker here, because a spare of one type could beat the optimum over the given
workers, so an unplaced replica counts as a miss). Spec §6 binpack scores the fullest *GPU*, so a small
model lands on a fresh small GPU of an empty worker rather than on a half-used large one; that costs
workers here:

{mixed_table}

## Rerun

    .venv/bin/python bench/packing.py           # everything (this page, packing.json, PNGs)
    .venv/bin/python bench/packing.py --quick   # smoke run, writes nothing

Options: `--seeds N` (fast strategies, default 3), `--core-seeds N` (strategies through `place()`,
default 2: ~15 s per run), `--instances N`, `--mixed-instances N`, `--jobs N`.
"""
