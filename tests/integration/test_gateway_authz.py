"""The gateway on its ext_authz transport end to end: real Envoy, Gantry's picker answering Envoy's HTTP
authorization checks and reading Envoy's gRPC access log, real NATS, real emulated engine servers. The same
behaviours as the ext_proc path (tests/integration/test_gateway.py, whose fixtures these reuse), checked where
the request landed (the engine's own counters) and in the picker's books (its ``/stats``)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ops.envoy import SERVED, EnvoyOptions, FailureMode, PickerTransport, start_envoy
from ops.servers import ServerProcess, free_port
from services.gateway.epp import PICKED
from tests.integration.test_gateway import (
    _SKIP,
    MODEL,
    REPO,
    Engine,
    Gateway,
    _chat,
    _engines,
    _start_engine,
    _stop,
    _wait_routable,
    after_endpoint_kill,
    shed_and_kept,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
if _SKIP:
    pytestmark.append(pytest.mark.skip(reason=_SKIP))


class AuthzGateway(Gateway):
    http_port: int = 0
    http_ports: tuple[int, ...] = ()

    def stats(self, port: int = 0) -> dict[str, Any]:
        """A picker's books, from its own port (not routed by Envoy; default: the first replica's)."""
        out: dict[str, Any] = httpx.get(f"http://127.0.0.1:{port or self.http_port}/stats", timeout=5).json()
        return out


def _authz_gateway(nats_url: str, tmp_path: Path, failure_mode: FailureMode = FailureMode.FAIL_CLOSE,
                   replicas: int = 1) -> Iterator[AuthzGateway]:
    eds = tmp_path / "eds" / "engines.json"
    eds.parent.mkdir()
    http_ports, grpc_ports = tuple(free_port() for _ in range(replicas)), tuple(free_port() for _ in range(replicas))
    log = tmp_path / "picker.log"
    pickers = []
    with log.open("wb") as fh:
        for http_port, grpc_port in zip(http_ports, grpc_ports, strict=True):
            pickers.append(subprocess.Popen(
                [sys.executable, "-m", "services.gateway", "--transport", "ext_authz", "--nats-url", nats_url,
                 "--eds-path", str(eds), "--grpc-port", str(grpc_port), "--http-port", str(http_port),
                 "--expire-s", "2", "--staleness-s", "2"], cwd=REPO, stdout=fh, stderr=subprocess.STDOUT))
    envoy = None
    try:
        opts = EnvoyOptions(listen_port=free_port(), admin_port=free_port(), epp_port=http_ports,
                            als_port=grpc_ports, eds_path=eds, failure_mode=failure_mode,
                            transport=PickerTransport.EXT_AUTHZ)
        envoy = start_envoy(opts, tmp_path / "envoy")
        gw = AuthzGateway(envoy.url, pickers, envoy, log, opts.admin_port)
        gw.http_port = http_ports[0]
        gw.http_ports = http_ports
        yield gw
    finally:
        if envoy is not None:
            envoy.stop()
        for p in pickers:
            _stop(p)


@pytest.fixture
def gateway(nats_server: ServerProcess, tmp_path: Path) -> Iterator[AuthzGateway]:
    yield from _authz_gateway(nats_server.url, tmp_path)


@pytest.fixture
def engines(nats_server: ServerProcess, tmp_path: Path) -> Iterator[list[Engine]]:
    yield from _engines(nats_server.url, tmp_path, 2)


def _settled(gw: AuthzGateway, timeout: float = 5) -> dict[str, Any]:
    """The picker's books once nothing is in flight (the access log's entries arrive within its flush interval)."""
    deadline = time.monotonic() + timeout
    while (got := gw.stats())["inflight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    return got


def test_streamed_chat_lands_on_the_chosen_endpoint_and_the_access_log_ends_it(gateway: AuthzGateway,
                                                                               engines: list[Engine]) -> None:
    _wait_routable(gateway, len(engines))
    by_addr = {e.address: e for e in engines}
    finished = _settled(gateway)["finished"]
    for i in range(6):
        before = {e.instance: e.requests_served() for e in engines}
        with httpx.stream("POST", f"{gateway.url}/v1/chat/completions",
                          json=_chat(f"request {i} about the cluster", 16), timeout=30) as r:
            assert r.status_code == 200
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
            picked = r.headers[PICKED].split(",")
            served = r.headers[SERVED]
        assert lines[-1] == "data: [DONE]" and len(lines) >= 17
        target = by_addr[served]
        assert picked[0] == target.instance
        time.sleep(0.05)
        after = {e.instance: e.requests_served() for e in engines}
        assert after[target.instance] == before[target.instance] + 1
        assert all(after[e] == before[e] for e in after if e != target.instance)
    books = _settled(gateway)
    assert books["inflight"] == 0 and set(books["endpoints"].values()) == {0}
    assert books["finished"] == finished + 6


def test_models_are_listed_by_the_picker_through_envoy(gateway: AuthzGateway, engines: list[Engine]) -> None:
    _wait_routable(gateway, len(engines))
    got = httpx.get(f"{gateway.url}/v1/models", timeout=5)
    assert got.status_code == 200 and [m["id"] for m in got.json()["data"]] == [MODEL]


def test_no_endpoint_for_the_model_is_503(gateway: AuthzGateway, engines: list[Engine]) -> None:
    _wait_routable(gateway, len(engines))
    r = httpx.post(f"{gateway.url}/v1/chat/completions", json={**_chat("hi"), "model": "no-such-model"}, timeout=10)
    assert r.status_code == 503 and r.headers["content-type"] == "application/json"
    assert "no-such-model" in r.json()["error"]["message"]


def test_malformed_body_is_400_and_the_picker_keeps_serving(gateway: AuthzGateway, engines: list[Engine]) -> None:
    _wait_routable(gateway, len(engines))
    for body in (b"{not json", b"[]", b'{"model": 3}', b'{"model": "m"}', b"x" * 100_000):
        r = httpx.post(f"{gateway.url}/v1/chat/completions", content=body, timeout=10,
                       headers={"content-type": "application/json"})
        assert r.status_code == 400, (body[:20], r.status_code, r.text)
        assert r.json()["error"]["code"] == 400
    assert httpx.post(f"{gateway.url}/v1/chat/completions", json=_chat("still fine", 2, False),
                      timeout=10).status_code == 200
    assert _settled(gateway)["inflight"] == 0


def test_sheddable_request_is_429_when_the_pool_is_saturated(gateway: AuthzGateway, nats_server: ServerProcess,
                                                             tmp_path: Path) -> None:
    eng = _start_engine(nats_server.url, "gw-busy", tmp_path, "--max-num-seqs", "1", "--speedup", "1")
    try:
        _wait_routable(gateway, 1)
        assert shed_and_kept(gateway.url, eng) == (429, 200)
    finally:
        _stop(eng.proc)


def test_killed_endpoint_falls_back_and_the_load_moves_to_the_one_that_served(
        gateway: AuthzGateway, engines: list[Engine], nats_server: ServerProcess) -> None:
    _wait_routable(gateway, len(engines))
    dead, alive = engines
    moved = _settled(gateway)["moved"]
    rerouted = after_endpoint_kill(gateway.url, nats_server.url, dead, alive)
    books = _settled(gateway)
    assert books["moved"] - moved == len(rerouted)  # the access log named the fallback that served each
    assert books["inflight"] == 0 and set(books["endpoints"].values()) == {0}
    assert gateway.log.read_text().count(f"served by fallback {alive.instance}") == len(rerouted)


def _after_picker_killed(nats_url: str, tmp_path: Path, failure_mode: FailureMode,
                         engines: list[Engine]) -> list[int]:
    gen = _authz_gateway(nats_url, tmp_path, failure_mode)
    gw = next(gen)
    try:
        _wait_routable(gw, len(engines))
        gw.picker.send_signal(signal.SIGKILL)
        gw.picker.wait(5)
        codes = []
        for i in range(5):
            t = time.monotonic()
            r = httpx.post(f"{gw.url}/v1/chat/completions", json=_chat(f"no picker {i}", 2, False), timeout=10)
            assert time.monotonic() - t < 2.0  # at once, not after a timeout
            codes.append(r.status_code)
        return codes
    finally:
        gen.close()


def test_fail_close_with_the_picker_dead_refuses_at_once(nats_server: ServerProcess, tmp_path: Path,
                                                        engines: list[Engine]) -> None:
    before = sum(e.requests_served() for e in engines)
    assert _after_picker_killed(nats_server.url, tmp_path, FailureMode.FAIL_CLOSE, engines) == [500] * 5
    assert sum(e.requests_served() for e in engines) == before + 1  # only the warm-up request was sent


def test_fail_open_with_the_picker_dead_serves_on_the_models_servers(nats_server: ServerProcess, tmp_path: Path,
                                                                   engines: list[Engine]) -> None:
    before = sum(e.requests_served() for e in engines)
    assert _after_picker_killed(nats_server.url, tmp_path, FailureMode.FAIL_OPEN, engines) == [200] * 5
    time.sleep(0.05)
    assert sum(e.requests_served() for e in engines) == before + 6


def test_killed_picker_replica_checks_go_to_the_others_and_each_keeps_only_its_own_books(
        nats_server: ServerProcess, tmp_path: Path, engines: list[Engine]) -> None:
    gen = _authz_gateway(nats_server.url, tmp_path, replicas=3)
    gw = next(gen)
    try:
        _wait_routable(gw, len(engines))
        time.sleep(1.0)  # every replica heard the engines
        gw.pickers[0].send_signal(signal.SIGKILL)
        gw.pickers[0].wait(5)
        codes = []
        for i in range(30):
            r = httpx.post(f"{gw.url}/v1/chat/completions", json=_chat(f"after picker kill {i}", 2, False), timeout=30)
            codes.append(r.status_code)
            time.sleep(0.05)
        assert codes == [200] * 30  # a check the dead replica refused was sent to a live one
        live = gw.http_ports[1:]
        deadline = time.monotonic() + 5
        while any(gw.stats(p)["inflight"] for p in live) and time.monotonic() < deadline:
            time.sleep(0.05)
        books = [gw.stats(p) for p in live]
        # every replica heard every request's end, and ended exactly the ones it routed
        assert [b["inflight"] for b in books] == [0, 0]
        assert all(set(b["endpoints"].values()) == {0} for b in books)
        assert all(b["finished"] == b["picks"] for b in books)
        assert sum(b["picks"] for b in books) >= 30
    finally:
        gen.close()
