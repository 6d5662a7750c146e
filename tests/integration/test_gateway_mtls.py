"""Envoy and the picker over TCP with mutual TLS (``--tls-dir``/``--picker-tls-dir``): requests route through real
Envoy, a client straight at the picker's ports without Envoy's certificate (none, or one from another CA) is
refused at the handshake and books nothing, and connections stalled in their handshake fill the picker's cap
without cutting Envoy's own."""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from ops.envoy import SERVED
from ops.servers import ServerProcess
from ops.tls import ensure_picker_tls
from services.gateway.epp import PICKED
from services.gateway.protocol import CHECK_PREFIX, HEALTH_PATH, PickerTransport
from services.gateway.tls import PICKER_NAME, envoy_files
from tests.integration.test_gateway import (
    MODEL,
    Engine,
    Gateway,
    _chat,
    _engines,
    _gateway,
    _wait_routable,
    gateway_marks,
)

pytestmark = gateway_marks(90)

HEALTH_CHECK = "/grpc.health.v1.Health/Check"


@pytest.fixture
def tls_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """The stack's TLS directory and another CA's (a stranger's certificates)."""
    ours, theirs = tmp_path / "tls", tmp_path / "other-tls"
    ensure_picker_tls(ours)
    ensure_picker_tls(theirs)
    return ours, theirs


@pytest.fixture
def engine(nats_server: ServerProcess, tmp_path: Path) -> Iterator[list[Engine]]:
    yield from _engines(nats_server.url, tmp_path, 1)


def _client_context(tls_dir: Path, with_cert: Path | None) -> ssl.SSLContext:
    """A client trusting ``tls_dir``'s CA, presenting the Envoy certificate of ``with_cert`` (a TLS directory)."""
    ctx = ssl.create_default_context(cafile=str(envoy_files(tls_dir).ca))
    if with_cert is not None:
        files = envoy_files(with_cert)
        ctx.load_cert_chain(files.cert, files.key)
    return ctx


def _exchange(port: int, ctx: ssl.SSLContext, request: bytes) -> bytes:
    """What the picker's port answers ``request`` over TLS; ``b""`` when the handshake or the exchange is refused."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
                ctx.wrap_socket(raw, server_hostname=PICKER_NAME) as tls:
            tls.sendall(request)
            return tls.recv(65536)
    except (ssl.SSLError, ConnectionError):
        return b""


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: picker\r\n\r\n".encode()


def _stats(gw: Gateway, tls_dir: Path) -> dict[str, Any]:
    """The picker's books, read over its HTTP port with Envoy's certificate."""
    answer = _exchange(gw.tcp_ports[0][1], _client_context(tls_dir, tls_dir), _get("/stats"))
    out: dict[str, Any] = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    return out


def _health(port: int, tls_dir: Path, with_cert: Path | None) -> bytes | None:
    """The gRPC health check's answer on the picker's gRPC port, or None when the connection is refused."""
    ca = envoy_files(tls_dir).ca.read_bytes()
    key = cert = None
    if with_cert is not None:
        files = envoy_files(with_cert)
        key, cert = files.key.read_bytes(), files.cert.read_bytes()
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    with grpc.secure_channel(f"127.0.0.1:{port}", creds,
                             options=[("grpc.ssl_target_name_override", PICKER_NAME)]) as channel:
        try:
            answer: bytes = channel.unary_unary(HEALTH_CHECK)(b"", timeout=30)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err  # refused at the connection, not by the service
            return None
    return answer


def test_over_mutual_tls_a_chat_completion_routes_through_envoy(nats_server: ServerProcess, tmp_path: Path,
                                                                engine: list[Engine],
                                                                tls_dirs: tuple[Path, Path]) -> None:
    """ext_proc (gRPC, h2 negotiated); the ext_authz transport routes its warm-up request in the test below."""
    gen = _gateway(nats_server.url, tmp_path, 1, tcp=True, tls_dir=tls_dirs[0])
    gw = next(gen)
    try:
        _wait_routable(gw, 1)
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=_chat("over mutual tls", 2, False), timeout=10)
        assert r.status_code == 200 and r.headers[SERVED] == engine[0].address
        assert r.headers[PICKED].split(",")[0] == engine[0].instance
    finally:
        gen.close()


def test_a_client_without_envoys_certificate_is_refused_and_books_nothing(nats_server: ServerProcess,
                                                                          tmp_path: Path, engine: list[Engine],
                                                                          tls_dirs: tuple[Path, Path]) -> None:
    ours, theirs = tls_dirs
    gen = _gateway(nats_server.url, tmp_path, 1, transport=PickerTransport.EXT_AUTHZ, tcp=True, tls_dir=ours)
    gw = next(gen)
    try:
        _wait_routable(gw, 1)  # a chat completion routed through Envoy, its checks and log over mutual TLS
        grpc_port, http_port = gw.tcp_ports[0]
        deadline = time.monotonic() + 30  # Envoy's routed requests end through its access log: wait for them
        while (before := _stats(gw, ours))["inflight"] and time.monotonic() < deadline:
            time.sleep(0.1)
        body = json.dumps(_chat("forged check", 2, False)).encode()
        check = (f"POST {CHECK_PREFIX}/v1/chat/completions HTTP/1.1\r\nhost: picker\r\ncontent-type: "
                 f"application/json\r\nx-gateway-model-name: {MODEL}\r\ncontent-length: {len(body)}\r\n\r\n"
                 ).encode() + body
        for stranger in (None, theirs):  # no certificate; one from another CA
            assert _exchange(http_port, _client_context(ours, stranger), check) == b""
            assert _health(grpc_port, ours, stranger) is None
        after = _stats(gw, ours)
        assert (after["picks"], after["inflight"], after["endpoints"]) == (before["picks"], before["inflight"],
                                                                          before["endpoints"])
        # Envoy's certificate is let in on both ports (the refusals above are the certificate's, not the ports')
        assert _exchange(http_port, _client_context(ours, ours), _get(HEALTH_PATH)).startswith(b"HTTP/1.1 200")
        assert _health(grpc_port, ours, ours) is not None
    finally:
        gen.close()


def test_stalled_handshakes_fill_the_cap_and_envoys_own_connection_keeps_routing(nats_server: ServerProcess,
                                                                                 tmp_path: Path, engine: list[Engine],
                                                                                 tls_dirs: tuple[Path, Path]) -> None:
    ours, _ = tls_dirs
    cap = 6  # Envoy holds 2 or 3 of them (its checks, its health checks, /v1/models)
    gen = _gateway(nats_server.url, tmp_path, 1, "--max-connections", str(cap), transport=PickerTransport.EXT_AUTHZ,
                   tcp=True, tls_dir=ours)
    gw = next(gen)
    stalled: list[socket.socket] = []
    try:
        _wait_routable(gw, 1)
        http_port = gw.tcp_ports[0][1]
        # connections that never send a ClientHello: those past the cap are closed at once, the others hold the
        # remaining places (for the 10 s handshake timeout), all accepted before the next connection
        stalled = [socket.create_connection(("127.0.0.1", http_port)) for _ in range(cap)]
        assert _exchange(http_port, _client_context(ours, ours), _get(HEALTH_PATH)) == b""  # even Envoy's cert
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=_chat("behind stalled handshakes", 2, False), timeout=10)
        assert r.status_code == 200 and r.headers[SERVED] == engine[0].address  # on Envoy's open connection
        for sock in stalled:
            sock.close()
        deadline = time.monotonic() + 30  # the picker sees them go (and frees their places) on its own time
        while not (answer := _exchange(http_port, _client_context(ours, ours), _get("/stats"))):
            assert time.monotonic() < deadline, "the stalled handshakes' places never came back"
            time.sleep(0.05)
        conns = json.loads(answer.split(b"\r\n\r\n", 1)[1])["connections"]
        assert conns["handshaking"] == 0 and conns["refused"] >= 2 and conns["max"] == cap
    finally:
        for sock in stalled:
            sock.close()
        gen.close()
