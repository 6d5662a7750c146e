"""Does one emulated model server process keep emulated time under many concurrent streams?

Starts ``python -m services.engine_server`` (Llama-3.1-8B on one H100, speedup 1), then for each concurrency
N (16, 64, 256) opens N streaming completions at once (128-token prompts of distinct token ids, ``max_tokens``
tokens each, ``ignore_eos``) and measures, per stream, the client-observed TPOT = (arrival of the last token −
arrival of the first) / (tokens − 1). The model's TPOT for the same requests comes from a virtual-time twin of
the server's engine (same options, same prompts, arrivals at the clients' send offsets): what the emulated
GPU would take. Both are taken over the same token indices of each stream: those every stream decoded
together (after the last stream's first token, before the first stream's last), because the ramp while
requests arrive depends on how quickly the server parses them, not on whether it keeps time; the error over
whole requests is reported beside it. The server's CPU time (all its threads' run time, in ns, from
``/proc/<pid>/task/*/schedstat``; psutil's tick counts where that is missing) divided by the
tokens streamed gives CPU µs per streamed token. The server's ``gantry:engine_clock_lag_seconds`` figures are
read after each run.

Run: ``.venv/bin/python bench/engine_server.py [--runs 3] [--tokens 256] [--streams 16,64,256]``.
Writes docs/benchmarks/engine_server.{json,png}; the last line printed is the JSON summary.

Diagnosis: ``--speedup 4`` runs the same streams with the emulated clock four times faster (writes nothing). The
work per token is the same; only the wall time between two steps shrinks (6.8 ms to 1.7 ms at 16 streams). On a
nested VM, code that runs a few ms after the process last ran costs far more than the same code run back to back,
so the CPU per token at speedup 1 minus that at speedup 4 is what the idle gap between steps costs on the host.

The machine is shared with other agents (2 cores): each figure is the median over runs, and the load average
before and after is recorded beside it. The client is a bare asyncio protocol (no HTTP library) so that its
own cost per token stays far below the server's; it still shares the cores with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.progress import add_flag, progress  # noqa: E402
from bench.results import save  # noqa: E402
from ops.servers import free_port  # noqa: E402
from services.engine_server.server import ServerOptions, build_engine  # noqa: E402
from shared.core.engine import Request  # noqa: E402

PROMPT_LEN = 128
_USAGE = re.compile(rb'"completion_tokens":(\d+)')
_TOKEN_MARK = b'"text":" '  # a chunk carrying at least one (space-prefixed) word


@dataclass(slots=True)
class StreamResult:
    """What one client stream saw (monotonic seconds)."""

    sent: float = 0.0
    first: float = -1.0
    last: float = -1.0
    times: list[float] = field(default_factory=list)  # arrival of each token
    tokens: int = 0
    error: str | None = None


@dataclass(slots=True)
class _Client(asyncio.Protocol):
    request: bytes
    done: asyncio.Future[None]
    result: StreamResult = field(default_factory=StreamResult)
    tail: bytes = b""
    transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.result.sent = time.monotonic()
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buf = self.tail + data
        k = (self.tail[-len(_TOKEN_MARK) + 1:] + data).count(_TOKEN_MARK)  # marks cut by a boundary count once
        if k:
            if self.result.first < 0:
                self.result.first = now
            self.result.last = now
            self.result.times.extend([now] * k)
        m = _USAGE.search(buf)
        if m:
            self.result.tokens = int(m.group(1))
        if b"[DONE]" in buf:
            if not self.done.done():
                self.done.set_result(None)
            if self.transport is not None:
                self.transport.close()
        elif b" 200 OK" not in buf[:40] and buf.startswith(b"HTTP/1.1 ") and not self.done.done():
            self.result.error = buf[:200].decode(errors="replace")
            self.done.set_result(None)
        self.tail = buf[-64:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.result.error = f"connection lost: {exc}"
            self.done.set_result(None)


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 4000) for _ in range(PROMPT_LEN)] for _ in range(n)]


async def _run_streams(port: int, prompts: list[list[int]], tokens: int) -> list[StreamResult]:
    loop = asyncio.get_running_loop()
    clients: list[_Client] = []
    for p in prompts:
        body = json.dumps({"prompt": p, "max_tokens": tokens, "ignore_eos": True, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        clients.append(_Client(head + body, loop.create_future()))

    def factory(c: _Client) -> Callable[[], _Client]:
        return lambda: c

    await asyncio.gather(*(loop.create_connection(factory(c), "127.0.0.1", port) for c in clients))
    await asyncio.wait_for(asyncio.gather(*(c.done for c in clients)), timeout=600)
    return [c.result for c in clients]


def model_token_times(opts: ServerOptions, prompts: list[list[int]], offsets: list[float],
                      tokens: int) -> list[list[float]]:
    """When each request's tokens come out of the server's engine in virtual time (arrivals at ``offsets``)."""
    engine = build_engine(opts)
    reqs = [Request(f"r{i}", p, max_tokens=tokens, ignore_eos=True, arrival_time=t, uid=i)
            for i, (p, t) in enumerate(zip(prompts, offsets, strict=True))]
    times: dict[str, list[float]] = {r.req_id: [] for r in reqs}
    pending = sorted(reqs, key=lambda r: r.arrival_time, reverse=True)
    while pending or engine.has_work():
        while pending and (pending[-1].arrival_time <= engine.now or not engine.has_work()):
            engine.add_request(pending.pop())
        res = engine.step()
        end = res.start + res.duration
        for r in res.output.sampling:
            times[r.req_id].append(end)
    return [times[r.req_id][:tokens] for r in reqs]


def _window(client: list[list[float]]) -> tuple[float, float]:
    """The span in which every stream was decoding: after the last first token, before the first last one."""
    return max(t[0] for t in client), min(t[-1] for t in client)


def _tpot(times: list[float], a: int, b: int) -> float:
    return (times[b] - times[a]) / (b - a)


def _lag(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for name in ("gantry:engine_clock_lag_seconds", "gantry:engine_clock_lag_max_seconds"):
        m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
        if m:
            out[name.split(":")[1]] = float(m.group(1))
    return out


def server_cpu_s(proc: psutil.Process) -> float:
    """CPU seconds of ``proc`` so far: the scheduler's nanosecond run time summed over its threads on Linux
    (``/proc/<pid>/task/*/schedstat``); ``cpu_times`` elsewhere. ``cpu_times`` counts in 10 ms ticks, and a
    16-stream run uses about 0.1 s of server CPU: ±10% from rounding alone."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{proc.pid}/task"):
            with open(f"/proc/{proc.pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        t = proc.cpu_times()
        return float(t.user + t.system)
    return total / 1e9


def server_wakeups(proc: psutil.Process) -> dict[str, int]:
    """Voluntary context switches of ``proc`` so far, per thread name (each is one sleep and one wake-up: on this
    host a wake-up after a few ms idle is what costs, docs/engine.md round 10)."""
    out: dict[str, int] = {}
    try:
        for task in os.listdir(f"/proc/{proc.pid}/task"):
            with open(f"/proc/{proc.pid}/task/{task}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            name = fields["Name"].strip()
            out[name] = out.get(name, 0) + int(fields["voluntary_ctxt_switches"])
    except (OSError, ValueError, KeyError):
        return {}
    return out


def one_run(port: int, proc: psutil.Process, opts: ServerOptions, n: int, tokens: int, seed: int,
            speedup: float = 1.0) -> dict[str, Any]:
    """N streams at once; client vs model TPOT p50 and server CPU per token (the model's times in wall seconds
    at ``speedup``, the server's)."""
    prompts = _prompts(n, seed)
    c0, s0, v0 = proc.cpu_times(), server_cpu_s(proc), server_wakeups(proc)
    w0, k0 = time.perf_counter(), time.process_time()
    results = asyncio.run(_run_streams(port, prompts, tokens))
    wall, client_cpu = time.perf_counter() - w0, time.process_time() - k0
    c1, s1, v1 = proc.cpu_times(), server_cpu_s(proc), server_wakeups(proc)
    good = [i for i, r in enumerate(results) if r.error is None and len(r.times) == r.tokens == tokens]
    streamed = sum(r.tokens for r in results)
    cpu = s1 - s0
    ticks = (c1.user - c0.user) + (c1.system - c0.system)  # only for the kernel's share
    t_send0 = min(r.sent for r in results)
    model = [[t / speedup for t in ts] for ts in
             model_token_times(opts, prompts, [(r.sent - t_send0) * speedup for r in results], tokens)]
    # Compare over the tokens every stream decoded together, index for index: the ramp while requests
    # arrive depends on how fast the server parses them, which is not what this measures.
    lo, hi = _window([results[i].times for i in good])
    client, ref, full = [], [], []
    for i in good:
        ts = results[i].times
        a = next(k for k, t in enumerate(ts) if t >= lo)
        b = max(k for k, t in enumerate(ts) if t <= hi)
        if b - a < 8:
            a, b = 0, len(ts) - 1
        client.append(_tpot(ts, a, b))
        ref.append(_tpot(model[i], a, b))
        full.append(_tpot(ts, 0, len(ts) - 1) / _tpot(model[i], 0, len(ts) - 1) - 1)
    c50, m50 = statistics.median(client), statistics.median(ref)
    return {
        "streams": n, "ok": len(good), "failed": n - len(good),
        "tpot_client_p50_ms": 1e3 * c50, "tpot_model_p50_ms": 1e3 * m50,
        "tpot_error_pct": 100 * (c50 / m50 - 1),
        "tpot_whole_request_error_p50_pct": 100 * statistics.median(full),
        "tpot_client_p90_ms": 1e3 * statistics.quantiles(client, n=10)[-1] if len(client) > 1 else 1e3 * c50,
        "ttft_client_p50_ms": 1e3 * statistics.median(results[i].first - results[i].sent for i in good),
        "cpu_us_per_token": 1e6 * cpu / max(streamed, 1), "server_cpu_s": cpu,
        "server_sys_share": (c1.system - c0.system) / ticks if ticks else 0.0,
        "client_cpu_us_per_token": 1e6 * client_cpu / max(streamed, 1), "wall_s": wall,
        "tokens": streamed, **_lag(port),
        # per thread: one decode step per token of a stream, so wake-ups / tokens × streams is per step
        "server_wakeups_per_step": {k: round((v1.get(k, 0) - v0.get(k, 0)) * n / max(streamed, 1), 2)
                                    for k in v1 if v1.get(k, 0) != v0.get(k, 0)},
    }


def _median_rows(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for i in range(len(runs[0])):
        row: dict[str, Any] = {}
        for k, v in runs[0][i].items():
            if isinstance(v, dict):  # per thread: the median of each thread's figure
                row[k] = {t: statistics.median(r[i][k].get(t, 0) for r in runs) for t in v}
            else:
                row[k] = statistics.median(r[i][k] for r in runs)
        rows.append(row)
    return rows


def plot(rows: list[dict[str, Any]], png: Path) -> None:
    """TPOT error and CPU per token against concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [str(int(r["streams"])) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar(xs, [r["tpot_error_pct"] for r in rows], color="tab:blue")
    a.axhline(5, color="red", ls="--", label="target ±5%")
    a.axhline(-5, color="red", ls="--")
    a.set_xlabel("concurrent streams")
    a.set_ylabel("client TPOT p50 vs model (%)")
    a.legend()
    b.bar(xs, [r["cpu_us_per_token"] for r in rows], color="tab:orange")
    b.axhline(20, color="red", ls="--", label="target 20 µs")
    b.set_xlabel("concurrent streams")
    b.set_ylabel("server CPU µs per streamed token")
    b.legend()
    fig.suptitle("One emulated model server process, speedup 1 (medians; shared 2-core machine)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def _wait_up(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("engine server exited during start-up")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("engine server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=256, help="output tokens per stream")
    ap.add_argument("--streams", default="16,64,256")
    ap.add_argument("--no-write", action="store_true", help="print only (do not overwrite docs/benchmarks)")
    ap.add_argument("--speedup", type=float, default=1.0,
                    help="diagnosis only (implies --no-write): the same streams with the emulated clock this many "
                         "times faster, steps closer together in wall time; the target is stated at 1")
    add_flag(ap)
    args = ap.parse_args()
    counts = [int(x) for x in args.streams.split(",")]
    if not args.speedup > 0:
        ap.error("--speedup must be > 0")
    opts = ServerOptions(port=free_port(), max_num_seqs=max(256, *counts))
    cmd = [sys.executable, "-m", "services.engine_server", "--port", str(opts.port), "--speedup", str(args.speedup),
           "--max-num-seqs", str(opts.max_num_seqs)]
    load0 = os.getloadavg()
    # the server's log (access lines, lag warnings) goes to a file: an unread pipe would fill after ~1,000
    # access lines and block the server's event loop in the middle of a run
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed after the server stops, in the finally below
    server = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
    runs: list[list[dict[str, Any]]] = []
    try:
        _wait_up(opts.port, server)
        proc = psutil.Process(server.pid)
        for k in progress(range(args.runs), args.runs, "engine_server runs", args.progress):
            row = [one_run(opts.port, proc, opts, n, args.tokens, seed=1000 * k + n, speedup=args.speedup)
                   for n in counts]
            runs.append(row)
            for r in row:
                print(f"run {k}: {int(r['streams']):4d} streams  TPOT client {r['tpot_client_p50_ms']:.2f} ms  "
                      f"model {r['tpot_model_p50_ms']:.2f} ms  error {r['tpot_error_pct']:+.1f}% "
                      f"(whole requests {r['tpot_whole_request_error_p50_pct']:+.1f}%)  "
                      f"CPU {r['cpu_us_per_token']:.1f} µs/token (sys {100 * r['server_sys_share']:.0f}%)  "
                      f"client {r['client_cpu_us_per_token']:.1f} µs/token  failed {int(r['failed'])}", file=sys.stderr)
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.seek(0)
        lag_warnings = sum(b"fell" in line and b"behind the emulated clock" in line for line in log)
        log.close()
    rows = _median_rows(runs)
    result = {
        "bench": "engine_server", "runs": args.runs, "tokens_per_stream": args.tokens, "prompt_len": PROMPT_LEN,
        "model": opts.model, "gpu": opts.gpu, "speedup": args.speedup, "cpus": os.cpu_count(),
        "loadavg_before": load0, "loadavg_after": os.getloadavg(), "server_lag_warnings": lag_warnings,
        "rows": rows, "all_runs": runs,
        "max_abs_error_pct": max(abs(r["tpot_error_pct"]) for r in rows),
        "max_cpu_us_per_token": max(r["cpu_us_per_token"] for r in rows),
    }
    if not args.no_write and args.speedup == 1:
        save("engine_server", result, lambda png: plot(rows, png))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
