"""CPU of one ext_authz check in process: the picker's answer to Envoy's check (framing, parsing, tokenizing,
the routing decision, the answer's bytes), then the deferred insertions and the access-log entry that ends it.

Why: the gateway's added latency is mostly what the picker does between a check arriving and its answer
leaving (docs/gateway.md, "Issue 18: where the picker's time goes"), and wall latency on this shared 2-core
host moves with load. This is the deterministic part, measured as the thread's CPU time per check.

Setup: ``services.gateway.authz.AuthzPicker`` over the default routing profile and the shipped tokenizer, one
engine of model ``bench-model`` (as ``bench/gateway.py``), the same request bodies as ``bench/gateway.py``
(distinct ~60-token chats) and a check head as Envoy sends it. Two modes:

- ``hot``: checks back to back (``--checks`` per run): what the code costs with warm caches;
- ``cold``: ``--gap-ms`` of sleep before each check (10 ms: one check per 10 ms, as the live picker gets at
  100 requests/s): what the same code costs when the core did other things, or nothing, in between. On this
  host a sleeping process runs its next check 2-3x slower than a hot loop.

With ``--framing`` each check goes through the picker's HTTP/1.1 server instead (``services.gateway.http1``:
``OneByOne.data_received`` on a real unix socket pair, its connection kept by a ``Connections`` as the picker's
listener keeps it, the answer written to the socket), and each run also times ``--checks`` checks answered with a
constant (``noop_us_*``: the framing alone). ``--baseline-http1 FILE`` (another version of ``http1.py``, e.g.
``git show COMMIT:services/gateway/http1.py``) runs it too, interleaved run by run with the current one, the
order alternating, for an A/B in one window (a module without ``Connections`` runs unbounded).

Run: ``.venv/bin/python bench/gateway_check.py [--runs 5] [--checks 3000] [--cold-checks 300] [--gap-ms 10]
[--framing [--baseline-http1 FILE]]``. Prints one JSON line per run and a summary line (medians of the runs,
per variant); writes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import msgspec  # noqa: E402
import uvloop  # noqa: E402

from bench.gateway import MODEL, body, pct  # noqa: E402
from services.gateway import http1 as current_http1  # noqa: E402
from services.gateway.authz import AuthzPicker, Logged  # noqa: E402
from services.gateway.epp import Picker  # noqa: E402
from services.gateway.protocol import PICK_ID_HEADER, PICKER_IDLE_TIMEOUT_S, PICKER_MAX_CONNECTIONS  # noqa: E402
from services.gateway.service import router_config, shipped_tokenizer  # noqa: E402
from shared.bus.messages import EngineMetrics  # noqa: E402
from shared.core.routing import Router  # noqa: E402
from shared.host.engine_feed import PoolView, metrics_of  # noqa: E402

ENGINE = "127.0.0.1:8001"
HEAD = (b"POST /check/v1/chat/completions HTTP/1.1\r\nhost: gantry-picker\r\ncontent-type: application/json\r\n"
        b"x-request-id: 6f1c2d3e-0000-4000-8000-0123456789ab\r\ncontent-length: %d")
PICK_ID = PICK_ID_HEADER.encode() + b": "


class Bench:
    """One picker's ext_authz answers over one engine, its clock driven by the bench."""

    def __init__(self) -> None:
        self.now = time.time()
        self.router = Router(router_config("default"), seed=0)
        self.report = EngineMetrics(instance_id="e1", model=MODEL, url=f"http://{ENGINE}", ts=self.now,
                                    num_requests_running=0, num_requests_waiting=0, kv_cache_usage_perc=0.0,
                                    block_size=16, num_gpu_blocks=3200)
        view = PoolView()
        view.observe(self.report, self.now)
        self.router.set_endpoints(list(view.endpoints.values()))
        addrs = {e.id: e.address for e in view.endpoints.values()}
        self.authz = AuthzPicker(Picker(self.router, lambda: addrs, clock=lambda: self.now,
                                        tokenize=shipped_tokenizer()))
        self.reported = -1.0

    def check(self, head: bytes, payload: bytes, framing: Framed | None = None) -> float:
        """One check: thread CPU seconds of its answer (what Envoy waits for; with ``framing``, from its bytes
        arriving to its answer written); then the deferred insertions and its access-log entry (off the
        request's path, not timed)."""
        self.tick()
        if framing is None:
            t0 = time.thread_time()
            got = self.authz.answer(head, payload)
            spent = time.thread_time() - t0
        else:
            spent, got = framing.check(head + b"\r\n\r\n" + payload)
        self.settle(got)
        return spent

    def tick(self) -> None:
        """The clock 10 ms on (a check every 10 ms), and an engine report when one is due."""
        self.now += 0.01
        if self.now - self.reported > 0.05:  # an engine report every 50 ms, as the emulated engines send
            self.router.update_metrics("e1", metrics_of(msgspec.structs.replace(self.report, ts=self.now)))
            self.reported = self.now

    def settle(self, got: object) -> None:
        """After an answer ``got``: the deferred insertions, and the access-log entry that ends its request."""
        if not isinstance(got, bytes):
            raise RuntimeError("a bench prompt was tokenized off the loop")
        self.router.flush()
        rid = got.split(PICK_ID, 1)[1].split(b"\r\n", 1)[0].decode()
        self.authz.finished(Logged(rid, ENGINE, 200))


class Framed:
    """One connection of ``http1``'s server over a real unix socket pair, answering with ``answer``."""

    def __init__(self, http1: ModuleType, answer: Callable[[bytes, bytes], bytes]) -> None:
        self.server_end, self.peer = socket.socketpair()
        self.peer.setblocking(False)
        bounded = getattr(http1, "Connections", None)
        kw = {} if bounded is None else {"conns": bounded(PICKER_IDLE_TIMEOUT_S, PICKER_MAX_CONNECTIONS)}
        self.protocol = http1.OneByOne(answer, **kw)

    async def open(self) -> None:
        """Hand the server end to the running loop (uvloop), as an accepted connection."""
        await asyncio.get_running_loop().connect_accepted_socket(lambda: self.protocol, self.server_end)

    def check(self, request: bytes) -> tuple[float, bytes]:
        """Thread CPU seconds from the request's bytes handed to the protocol to its answer written (uvloop
        writes at once when the socket has room), and the answer as the peer read it."""
        t0 = time.thread_time()
        self.protocol.data_received(request)
        spent = time.thread_time() - t0
        return spent, self.peer.recv(1 << 20)

    def close(self) -> None:
        """Close both ends."""
        if self.protocol.transport is not None:
            self.protocol.transport.close()
        self.peer.close()


def load_http1(path: Path) -> ModuleType:
    """Another version of ``services/gateway/http1.py``, loaded from ``path`` under its own name."""
    spec = importlib.util.spec_from_file_location("baseline_http1", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def requests(start: int, n: int) -> list[tuple[bytes, bytes]]:
    """``n`` checks as Envoy sends them (head, body), bodies numbered from ``start``."""
    out = []
    for i in range(start, start + n):
        payload = msgspec.json.encode(body(i))
        out.append((HEAD % len(payload), payload))
    return out


async def run(checks: int, cold_checks: int, gap_s: float, start: int,
              http1: ModuleType | None = None) -> dict[str, Any]:
    """One run: ``checks`` back to back, then ``cold_checks`` each after ``gap_s`` of sleep (µs per check);
    with ``http1``, through its framing, and ``checks`` more answered with a constant."""
    b = Bench()
    framing = Framed(http1, b.authz.answer) if http1 is not None else None  # type: ignore[arg-type]
    if framing is not None:
        await framing.open()
    hot = [b.check(h, p, framing) for h, p in requests(start, checks)]
    cold = []
    for h, p in requests(start + checks, cold_checks):
        time.sleep(gap_s)  # the whole process idle, as between two checks at 100 requests/s
        cold.append(b.check(h, p, framing))
    await asyncio.sleep(0)  # the answers' deferred flushes (already applied above) run here
    out = {"hot_us_mean": round(statistics.fmean(hot) * 1e6, 1), "hot_us_p50": _p(hot, 0.5),
           "cold_us_p50": _p(cold, 0.5), "cold_us_p90": _p(cold, 0.9)}
    if http1 is not None and framing is not None:
        framing.close()
        reply = current_http1.response(200, headers=(("x-gateway-destination-endpoint", ENGINE),))
        noop = Framed(http1, lambda _h, _b: reply)
        await noop.open()
        head, payload = requests(start, 1)[0]
        spent = [noop.check(head + b"\r\n\r\n" + payload)[0] for _ in range(checks)]
        noop.close()
        out |= {"noop_us_mean": round(statistics.fmean(spent) * 1e6, 2), "noop_us_p50": _p(spent, 0.5)}
    return out


def _p(xs: list[float], q: float) -> float:
    return round(pct(xs, q) * 1e6, 1)


V = TypeVar("V")


def interleaved(variants: dict[str, V], a: argparse.Namespace,
                one_run: Callable[[V, int], Coroutine[Any, Any, dict[str, Any]]], summary: dict[str, Any]) -> None:
    """Run every variant ``a.runs`` times, alternating which goes first (neither always runs on a warmer or cooler
    host), each on a fresh uvloop with its own requests; print a JSON line per run, then one per variant with the
    medians (``summary`` and the run settings in it)."""
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for r in range(a.runs):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            row = uvloop.run(one_run(variants[name], r * (a.checks + a.cold_checks)))
            row = {"run": r, "variant": name, "load_avg_1m": round(os.getloadavg()[0], 2), **row}
            print(json.dumps(row), flush=True)
            rows[name].append(row)
    for name, got in rows.items():
        print(json.dumps({**summary, "variant": name, "runs": a.runs, "checks": a.checks,
                          "cold_checks": a.cold_checks, "gap_ms": a.gap_ms,
                          **{k: statistics.median(r[k] for r in got) for k in got[0]
                             if k not in ("run", "variant")}}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--checks", type=int, default=3000, help="hot checks per run")
    p.add_argument("--cold-checks", type=int, default=300, help="checks after a sleep, per run")
    p.add_argument("--gap-ms", type=float, default=10.0, help="sleep before each cold check")
    p.add_argument("--framing", action="store_true", help="each check through the picker's HTTP/1.1 server")
    p.add_argument("--baseline-http1", type=Path, default=None,
                   help="with --framing: also run this version of http1.py, interleaved (A/B)")
    a = p.parse_args()
    if min(a.runs, a.checks, a.cold_checks) < 1 or not a.gap_ms >= 0:  # (an empty run has no median to print)
        p.error("--runs, --checks and --cold-checks must be >= 1, --gap-ms >= 0")
    if a.baseline_http1 is not None and not a.framing:
        p.error("--baseline-http1 needs --framing")
    variants: dict[str, ModuleType | None] = {"current": current_http1 if a.framing else None}
    if a.baseline_http1 is not None:
        variants["baseline"] = load_http1(a.baseline_http1)
    interleaved(variants, a, lambda v, start: run(a.checks, a.cold_checks, a.gap_ms / 1000, start, v),
                {"bench": "gateway_check", "framing": a.framing})


if __name__ == "__main__":
    main()
