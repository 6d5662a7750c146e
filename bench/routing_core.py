"""Routing-core decision latency: 100 endpoints, 4,000-token prompts, in process.

Setup: 100 endpoints of one model, each with its own step-time model (half H100-like, half A100-like
calibrated models, so the latency predictor does real work), metrics with seeded random queue, running
and KV figures re-reported every 50 decisions. Prompts: 200 tenants, each with a 2,048-token shared
system prompt, plus a 1,952-token request-unique part (4,000 tokens). The router is warmed with 2,000
requests (their KV events fill the precise index, their decisions the approximate one). Each measured
decision is ``Router.route`` on token ids: chained block hashing (the engines' ``chain_hashes``, 16-token
blocks, hashed as far as a match needs), filters, scorers, picker and the commit's in-flight accounting.
The commit's assumed-state insertion (hashing the rest of the prompt, inserting its 250 hashes) runs in
``Router.flush()`` after the decision, as a service does after replying; it is timed separately
(``index_update_cpu_*``). Requests stay in flight for 64 decisions (first token after 16). Timed with
``perf_counter`` (wall) and ``thread_time`` (CPU).

Cases: ``default`` (the target: default profile), ``default-prehashed`` (the same with the block hashes
supplied by the caller, i.e. the core without hashing), ``default-no-memo`` (the same without the router's
memo of hashed prompt chunks, ``data.hash_memo_chunks: 0``: every decision hashes as far as its match goes),
``default-reports`` (the same with one engine's state report taken before every decision, untimed, as 100 engines
reporting every 50 ms send 20 per decision at 100 decisions/s: a report must not make the next decision dearer),
``gie`` (queue 2 / KV 2 / approximate prefix 3), ``hash-only`` (``chain_hashes`` of the 4,000 tokens, for scale).

Run: ``.venv/bin/python bench/routing_core.py [--runs N] [--decisions N]``. Prints one JSON line per case
and a final summary line; writes docs/benchmarks/routing_core.{json,png}. The machine is shared (2 cores,
several agents), so figures are medians over runs, with CPU time beside wall time.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shared.core.engine import CalibratedStepTime  # noqa: E402
from shared.core.kv_events import BlockStored, KVEventBatch, chain_hashes  # noqa: E402
from shared.core.routing import Endpoint, EndpointMetrics, Router, RouteRequest, builtin_config  # noqa: E402

OUT = REPO / "docs" / "benchmarks"
ENDPOINTS, TENANTS, PREFIX, PROMPT = 100, 200, 2048, 4000
NOW = 1000.0
TARGET_P50_US, TARGET_P99_US = 150.0, 500.0
WINDOW = 64  # requests in flight at once


def prompt(rng: random.Random, tenant: int) -> list[int]:
    """A tenant's shared prefix plus a unique tail."""
    shared = [tenant * 1_000_003 + i for i in range(PREFIX)]
    return shared + [rng.randrange(150_000) for _ in range(PROMPT - PREFIX)]


def make_router(profile: str, seed: int) -> Router:
    """100 endpoints with metrics, step models and in-flight load."""
    rng = random.Random(seed)
    r = Router(builtin_config(profile), seed=seed)
    h100 = CalibratedStepTime(base_s=0.006, per_token_s=6.0e-5, per_kv_token_s=1e-8)
    a100 = CalibratedStepTime(base_s=0.009, per_token_s=1.2e-4, per_kv_token_s=2e-8)
    for i in range(ENDPOINTS):
        r.state.upsert(Endpoint(id=f"ep-{i:03d}", model="m", address=f"10.0.{i // 250}.{i % 250}:8000",
                                gpu="H100" if i % 2 else "A100", num_gpu_blocks=30_000), h100 if i % 2 else a100)
        r.update_metrics(f"ep-{i:03d}", EndpointMetrics(ts=NOW, waiting=rng.randrange(4), running=rng.randrange(64),
                                                         kv_usage=rng.random() * 0.7))
    return r


def requests(seed: int, n: int) -> list[RouteRequest]:
    """``n`` requests over the tenants."""
    rng = random.Random(seed)
    return [RouteRequest(f"r{seed}-{i}", "m", token_ids=prompt(rng, rng.randrange(TENANTS))) for i in range(n)]


def warm(r: Router, seed: int, n: int) -> None:
    """Route ``n`` requests and feed the engines' view (KV events) of where they went."""
    for req in requests(seed + 7, n):
        out = r.route(req, NOW)
        if out.__class__.__name__ == "Decision":
            toks = list(req.token_ids or ())
            r.apply_kv_events(out.endpoint, KVEventBatch(ts=NOW, events=[  # type: ignore[union-attr]
                BlockStored(chain_hashes(toks, 16), None, [], 16)]))
        r.finished(req.request_id)
        r.flush()


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def run_case(case: str, seed: int, decisions: int) -> dict[str, float]:
    """One run: per-decision wall and CPU microseconds, and the deferred index update beside it.

    Requests stay in flight for ``WINDOW`` decisions (first token after ``WINDOW // 4``), so the router's
    in-flight accounting spreads them as in a service; metrics are re-reported every 50 decisions."""
    profile = {"gie": "gie"}.get(case, "default")
    r = make_router(profile, seed)
    if case == "default-no-memo":
        r.state.chunk_memo = None
    warm(r, seed, 2000)
    r.flush()
    reqs = requests(seed, decisions)
    if case == "default-prehashed":  # the gateway hashed the prompt already (not timed)
        reqs = [RouteRequest(q.request_id, q.model, block_hashes=chain_hashes(q.token_ids or (), 16),
                             prompt_tokens=PROMPT) for q in reqs]
    rng = random.Random(seed)
    pool = r.state.pool("m")
    wall: list[float] = []
    cpu: list[float] = []
    flush_cpu: list[float] = []
    gc.collect()
    gc.disable()
    try:
        for i, req in enumerate(reqs):
            toks = req.token_ids
            if case == "default-reports":
                ep = pool[i % len(pool)]
                r.update_metrics(ep.id, EndpointMetrics(ts=NOW, waiting=ep.inflight_requests // 2,
                                                        running=rng.randrange(64) + ep.inflight_requests,
                                                        kv_usage=rng.random() * 0.7))
            c0, t0 = time.thread_time(), time.perf_counter()
            if case == "hash-only":
                chain_hashes(toks or (), 16)
            else:
                r.route(req, NOW, commit=case != "default-no-commit")
            t1, c1 = time.perf_counter(), time.thread_time()
            r.flush()
            c2 = time.thread_time()
            wall.append((t1 - t0) * 1e6)
            cpu.append((c1 - c0) * 1e6)
            flush_cpu.append((c2 - c1) * 1e6)
            if i >= WINDOW // 4:
                r.first_token(reqs[i - WINDOW // 4].request_id)
            if i >= WINDOW:
                r.finished(reqs[i - WINDOW].request_id)
            if i % 50 == 0:
                for ep in r.state.pool("m"):
                    r.update_metrics(ep.id, EndpointMetrics(ts=NOW, waiting=ep.inflight_requests // 2,
                                                            running=rng.randrange(64) + ep.inflight_requests,
                                                            kv_usage=rng.random() * 0.7))
    finally:
        gc.enable()
    return {"p50_us": pct(wall, 0.5), "p90_us": pct(wall, 0.9), "p99_us": pct(wall, 0.99),
            "cpu_p50_us": pct(cpu, 0.5), "cpu_p99_us": pct(cpu, 0.99), "mean_us": statistics.fmean(wall),
            "index_update_cpu_p50_us": pct(flush_cpu, 0.5), "index_update_cpu_p99_us": pct(flush_cpu, 0.99),
            "endpoints_used": float(len({e.id for e in r.state.pool("m") if r.state.approx.blocks_of(e.slot)}))}


class Stopwatch:
    """Exclusive time per stage: a stage's time excludes the stages it calls (a stack of open stages)."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}
        self._stack: list[list[float]] = []  # [start, time taken by nested stages]

    def wrap(self, label: str, fn: Any) -> Any:
        """``fn`` timed as ``label``."""
        def timed(*args: Any, **kw: Any) -> Any:
            frame = [time.perf_counter(), 0.0]
            self._stack.append(frame)
            try:
                return fn(*args, **kw)
            finally:
                took = time.perf_counter() - frame[0]
                self._stack.pop()
                self.spent[label] = self.spent.get(label, 0.0) + took - frame[1]
                if self._stack:
                    self._stack[-1][1] += took
        return timed


def stages(seed: int, decisions: int) -> dict[str, float]:
    """Median µs per decision of each stage of the default profile (exclusive wall time, timer cost included):
    hashing, prefix-index lookup, each filter, each scorer, the profile's combination of scores, the picker,
    the commit, and the rest of ``route`` (admission, cycle, result objects)."""
    import shared.core.routing.hashing as hashing

    r = make_router("default", seed)
    warm(r, seed, 2000)
    r.flush()
    sw = Stopwatch()
    prof = r.handler.profile  # type: ignore[attr-defined]
    for f in prof.filters:
        f.filter = sw.wrap(f"filter {f.name}", f.filter)
    for sc, _ in prof.scorers:
        sc.score = sw.wrap(f"scorer {sc.name}", sc.score)
    prof.picker.pick = sw.wrap("picker", prof.picker.pick)
    prof.combine = sw.wrap("combine scores", prof.combine)
    r.commit = sw.wrap("commit", r.commit)  # type: ignore[method-assign]
    route = sw.wrap("route (rest)", r.route)
    saved = hashing.BlockHashes._extend, hashing._match
    hashing.BlockHashes._extend = sw.wrap("hashing", hashing.BlockHashes._extend)  # type: ignore[method-assign]
    hashing._match = sw.wrap("prefix lookup", hashing._match)
    per: dict[str, list[float]] = {}
    reqs = requests(seed, decisions)
    try:
        for i, req in enumerate(reqs):
            sw.spent = {}
            route(req, NOW)
            for k, v in sw.spent.items():
                per.setdefault(k, []).append(v * 1e6)
            per.setdefault("total", []).append(sum(sw.spent.values()) * 1e6)
            r.flush()
            if i >= WINDOW // 4:
                r.first_token(reqs[i - WINDOW // 4].request_id)
            if i >= WINDOW:
                r.finished(reqs[i - WINDOW].request_id)
    finally:
        hashing.BlockHashes._extend, hashing._match = saved  # type: ignore[method-assign]
    return {k: statistics.median(v + [0.0] * (decisions - len(v))) for k, v in per.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--decisions", type=int, default=2000)
    ap.add_argument("--cases", default="default,default-reports,default-prehashed,default-no-memo,gie,hash-only")
    ap.add_argument("--stages", action="store_true", help="also print the default profile's per-stage breakdown")
    args = ap.parse_args()
    results: dict[str, Any] = {}
    for case in args.cases.split(","):
        runs = [run_case(case, seed, args.decisions) for seed in range(args.runs)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        results[case] = {"median": med, "runs": runs}
        print(json.dumps({"case": case, **{k: round(v, 1) for k, v in med.items()}}), flush=True)
    if args.stages:
        runs = [stages(seed, args.decisions) for seed in range(args.runs)]
        results["stages"] = {"median": {k: statistics.median(r.get(k, 0.0) for r in runs) for k in runs[0]},
                             "runs": runs}
        print(json.dumps({"case": "stages", **{k: round(v, 1) for k, v in results["stages"]["median"].items()}}),
              flush=True)
    d = results.get("default", {}).get("median", {})
    summary = {
        "bench": "routing_core", "endpoints": ENDPOINTS, "prompt_tokens": PROMPT, "runs": args.runs,
        "decisions_per_run": args.decisions,
        "default_p50_us": round(d.get("p50_us", 0.0), 1), "default_p99_us": round(d.get("p99_us", 0.0), 1),
        "default_cpu_p50_us": round(d.get("cpu_p50_us", 0.0), 1),
        "target_p50_us": TARGET_P50_US, "target_p99_us": TARGET_P99_US,
        "meets_target": bool(d) and d["p50_us"] <= TARGET_P50_US and d["p99_us"] <= TARGET_P99_US,
        "cases": {k: {m: round(v, 1) for m, v in r["median"].items()} for k, r in results.items()},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "routing_core.json").write_text(json.dumps({**summary, "detail": results}, indent=1))
    plot(results)
    print(json.dumps(summary))


def plot(results: dict[str, Any]) -> None:
    """Bars: p50 / p99 wall and p50 CPU per case, with the targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in results if c != "stages"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.27
    for j, (key, label) in enumerate((("p50_us", "p50 wall"), ("p99_us", "p99 wall"), ("cpu_p50_us", "p50 CPU"))):
        ax.bar([i + (j - 1) * width for i in range(len(cases))], [results[c]["median"][key] for c in cases], width,
               label=label)
    ax.axhline(TARGET_P50_US, color="C0", ls="--", lw=1, label="target p50")
    ax.axhline(TARGET_P99_US, color="C1", ls="--", lw=1, label="target p99")
    ax.set_xticks(range(len(cases)), cases)
    ax.set_ylabel("µs per decision")
    ax.set_title(f"routing core: {ENDPOINTS} endpoints, {PROMPT}-token prompts (shared machine)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "routing_core.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
