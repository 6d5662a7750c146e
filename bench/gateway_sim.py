"""bench/gateway_vs_sglang.py's workload in virtual time: the same request list, tokenized as the engine
server does, replayed on the engine emulator behind the routing core or a model of sglang-router's policy.

Why: the live bench is noisy (a loaded 2-core host, 3 runs); this replays its exact request list
(``requests_of``, seeds 0-2) on 3 emulated Llama-3.1-8B/H100 engines with the live ``--num-gpu-blocks``
so a profile change can be judged in seconds. The TTFT p90 is reported both exact and as the live bench
computes it (interpolated inside vLLM's TTFT histogram buckets), hit rate as hit tokens / prompt tokens.

``sglang-ca``: a model of sglang-router's ``cache_aware`` policy, written from its documented behaviour
(sglang-router 0.3.2 ``launch_router --help`` defaults: cache_threshold 0.3, balance_abs_threshold 64,
balance_rel_threshold 1.5): per worker, an approximate tree of the prompts routed there (here: the set of
chained 16-token block ids); if the router's in-flight counts are imbalanced (max − min > 64 and max >
1.5 × min) the least loaded worker; else if the best match covers more than 30 % of the prompt, that
worker; else the worker with the smallest tree. Block-granular where sglang matches characters.

Routers: ``sglang-ca``, ``gantry[:PROFILE]``, ``rr``, ``least``, or ``file:PATH`` (a profile YAML, to try a
variant without touching the built-ins). After each router's per-seed lines and medians, a line compares it
seed by seed with the first router (TTFT p90 at most, exact and interpolated; hit rate at least).

Run: ``PYTHONPATH=. .venv/bin/python bench/gateway_sim.py --groups 32,128 --routers sglang-ca,gantry
[--seeds 0-29 as 0,1,...]`` (about 0.3 s of CPU per simulation; prints JSON lines, writes nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.gateway_vs_sglang import Workload, exact_quantile, histogram_quantile, requests_of  # noqa: E402
from ops.cli.simulate import build_cluster  # noqa: E402
from services.engine_server.textgen import TextModel  # noqa: E402
from shared.core.engine import Engine, Request  # noqa: E402
from shared.core.routing import decode_config  # noqa: E402
from shared.core.sim import TraceRequest, simulate  # noqa: E402
from shared.core.sim.cluster import ClusterSpec  # noqa: E402
from shared.core.sim.gantry import GantryRouter  # noqa: E402

BLOCK = 16
# vLLM's TTFT histogram bounds (seconds), as the emulated engine server exports them
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)


def trace_of(w: Workload, text: TextModel) -> list[TraceRequest]:
    """The bench's requests as trace requests: chained ids of each full 16-token block of the rendered chat."""
    out = []
    for t, body in requests_of(w):
        toks = text.chat_prompt([(m["role"], m["content"]) for m in body["messages"]])
        ids: list[int] = []
        parent = 0
        for b in range(len(toks) // BLOCK):
            parent = hash((parent, tuple(toks[b * BLOCK:(b + 1) * BLOCK])))
            ids.append(parent)
        out.append(TraceRequest(t, len(toks), w.max_tokens, prefix_ids=tuple(ids), prefix_unit=BLOCK))
    return out


class SglangCacheAware:
    """A model of sglang-router's cache_aware policy (see the module docstring)."""

    needs_state = True

    def __init__(self, cache_threshold: float = 0.3, balance_abs: int = 64, balance_rel: float = 1.5) -> None:
        self.cache_threshold, self.balance_abs, self.balance_rel = cache_threshold, balance_abs, balance_rel
        self.trees: list[set[int]] = []
        self.live: dict[str, tuple[int, Request]] = {}

    def pick(self, engines: Sequence[Engine], now: float, request: Request) -> int:
        """The worker sglang's policy would choose."""
        if not self.trees:
            self.trees = [set() for _ in engines]
        for rid, (_, r) in list(self.live.items()):
            if 0 <= r.finish_time <= now:
                del self.live[rid]
        load = [0] * len(engines)
        for k, _ in self.live.values():
            load[k] += 1
        ids = request.prefix_ids or ()
        if max(load) - min(load) > self.balance_abs and max(load) > self.balance_rel * min(load):
            k = load.index(min(load))
        else:
            match = []
            for tree in self.trees:
                n = 0
                while n < len(ids) and ids[n] in tree:
                    n += 1
                match.append(n)
            best = max(range(len(engines)), key=lambda i: match[i])
            if match[best] * BLOCK / request.prompt_len > self.cache_threshold:
                k = best
            else:
                k = min(range(len(engines)), key=lambda i: len(self.trees[i]))
        self.trees[k].update(ids)
        self.live[request.req_id] = (k, request)
        return k

    def failed(self, request: Request) -> None:
        """Forget the request's in-flight count."""
        self.live.pop(request.req_id, None)


def spec_for(router: str, blocks: int) -> ClusterSpec:
    """3 replicas as the live bench runs them (``--num-gpu-blocks blocks``)."""
    # a profile file is a Gantry router: its engines publish KV events as the built-in profiles' do
    name = "rr" if router == "sglang-ca" else "gantry" if router.startswith("file:") else router
    spec = build_cluster("llama-3.1-8b", "H100-SXM-80GB", 3, router=name)
    cfg = replace(spec.config, num_gpu_blocks=blocks, max_model_len=min(spec.config.max_model_len or blocks * BLOCK,
                                                                        blocks * BLOCK))
    make = SglangCacheAware if router == "sglang-ca" else spec.router
    if router.startswith("file:"):  # a profile YAML (to try a variant without touching the built-ins)
        config = decode_config(Path(router[5:]).read_text())
        make = lambda: GantryRouter(config)  # noqa: E731
    return replace(spec, config=cfg, router=make)


def figures(res: Any) -> dict[str, Any]:
    """Hit rate, exact TTFT quantiles and the live bench's histogram-interpolated p90."""
    done = [r for r in res.requests if r.finish_time >= 0]
    ttfts = sorted(r.ttft for r in done)
    cum = [(b, float(sum(1 for x in ttfts if x <= b))) for b in TTFT_BUCKETS] + [(float("inf"), float(len(ttfts)))]
    s = res.summary()
    above20 = sum(1 for x in ttfts if x > 0.02)
    below10 = sum(1 for x in ttfts if x <= 0.01)
    return {"n": len(done), "lost": len(res.requests) - len(done) + len(res.rejected),
            "hit": s["prefix_cache_hit_rate"], "p90_hist_ms": 1000 * histogram_quantile(0.9, cum),
            "p90_ms": 1000 * exact_quantile(0.9, ttfts), "p50_ms": 1000 * statistics.median(ttfts),
            "mean_ms": 1000 * statistics.fmean(ttfts), "le10": below10, "gt20": above20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", default="32,128")
    ap.add_argument("--routers", default="gantry,sglang-ca")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--blocks", type=int, default=3200)
    a = ap.parse_args()
    text = TextModel()
    for g in (int(x) for x in a.groups.split(",")):
        traces = {s: trace_of(Workload(g, a.rate, a.seconds, seed=s), text) for s in map(int, a.seeds.split(","))}
        first: list[dict[str, Any]] = []
        for router in a.routers.split(","):
            rows: list[dict[str, Any]] = []
            for s, tr in traces.items():
                f = figures(simulate(tr, spec_for(router, a.blocks)))
                rows.append(f)
                print(json.dumps({"groups": g, "router": router, "seed": s,
                                  **{k: round(v, 5) if isinstance(v, float) else v for k, v in f.items()}}),
                      flush=True)
            print(json.dumps({"groups": g, "router": router, "median": {
                k: round(statistics.median(r[k] for r in rows), 5) for k in ("hit", "p90_hist_ms", "p90_ms",
                                                                              "mean_ms", "le10", "gt20")}}),
                  flush=True)
            if not first:
                first = rows
                continue
            # per seed against the first router (the live bench's Done-when compares run by run)
            pairs = list(zip(rows, first, strict=True))
            print(json.dumps({"groups": g, "router": router, "against": a.routers.split(",")[0], "seeds": len(rows),
                              "p90_at_most": sum(r["p90_ms"] <= f["p90_ms"] for r, f in pairs),
                              "p90_hist_at_most": sum(r["p90_hist_ms"] <= f["p90_hist_ms"] for r, f in pairs),
                              "hit_at_least": sum(r["hit"] >= f["hit"] for r, f in pairs),
                              "p90_hist_diff_ms": sorted(round(r["p90_hist_ms"] - f["p90_hist_ms"], 3)
                                                         for r, f in pairs)}),
                  flush=True)


if __name__ == "__main__":
    main()
