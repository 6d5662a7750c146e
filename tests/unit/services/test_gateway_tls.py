"""Mutual TLS between Envoy and the picker over TCP (opt-in): the generated files, the picker's and Envoy's options
(refused on unix sockets, bad files refused in one line), Envoy's upstream TLS config, and the picker's server
context admitting only a client whose certificate its CA signed."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import uvloop

from ops.envoy import EPP_CLUSTER, EnvoyOptions, envoy_config
from ops.envoy import parse_args as envoy_args
from ops.tls import ensure_picker_tls
from services.gateway.__main__ import parse_args as picker_args
from services.gateway.authz import AuthzPicker
from services.gateway.http1 import Connections, OneByOne, headers_of
from services.gateway.protocol import PickerTransport
from services.gateway.service import tcp_http_listener
from services.gateway.tls import (
    CA_FILE,
    ENVOY_KEY,
    PICKER_KEY,
    PICKER_NAME,
    envoy_files,
    load_picker_tls,
    picker_files,
    server_context,
    tls_listener,
)
from tests.unit.services.test_gateway_picker import picker, report

BASE = ["--nats-url", "nats://x:1", "--eds-path", "e.json"]
TLS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


@pytest.fixture(scope="module")
def tls_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("picker-tls")
    ensure_picker_tls(d)
    return d


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Files from another CA: its Envoy certificate is a stranger's."""
    d = tmp_path_factory.mktemp("other-tls")
    ensure_picker_tls(d)
    return d


def test_a_directory_holding_only_some_of_the_files_is_not_overwritten(tmp_path: Path) -> None:
    from ops.auth import AuthError

    (tmp_path / CA_FILE).write_bytes(b"an operator's own CA")
    with pytest.raises(AuthError, match="not replacing them"):
        ensure_picker_tls(tmp_path)
    assert (tmp_path / CA_FILE).read_bytes() == b"an operator's own CA"
    assert not (tmp_path / PICKER_KEY).exists()


def test_the_generated_directory_is_kept_as_it_is_once_written(tls_dir: Path) -> None:
    before = (tls_dir / CA_FILE).read_bytes()
    ensure_picker_tls(tls_dir)
    assert (tls_dir / CA_FILE).read_bytes() == before
    assert (tls_dir / PICKER_KEY).stat().st_mode & 0o077 == 0 and (tls_dir / ENVOY_KEY).stat().st_mode & 0o077 == 0


def test_the_picker_takes_a_tls_directory_only_with_tcp_ports(tls_dir: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        picker_args([*BASE, "--tls-dir", str(tls_dir)])
    assert "needs --grpc-port" in str(exit_.value.code)
    opts = picker_args([*BASE, "--grpc-port", "9100", "--tls-dir", str(tls_dir)])
    assert opts.tls is not None and opts.tls.ca == (tls_dir / CA_FILE).read_bytes()
    assert picker_args([*BASE, "--grpc-port", "9100"]).tls is None  # plain unless asked


def test_the_picker_refuses_missing_or_mismatched_tls_files_in_one_line(tls_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as missing:
        picker_args([*BASE, "--http-port", "9100", "--tls-dir", str(tmp_path)])
    assert "TLS file" in str(missing.value.code) and "\n" not in str(missing.value.code)
    for name in ("picker.pem", CA_FILE):
        shutil.copy(tls_dir / name, tmp_path / name)
    shutil.copy(tls_dir / ENVOY_KEY, tmp_path / PICKER_KEY)  # a key that is not the certificate's
    with pytest.raises(SystemExit) as mismatched:
        picker_args([*BASE, "--http-port", "9100", "--tls-dir", str(tmp_path)])
    assert "do not load" in str(mismatched.value.code) and "\n" not in str(mismatched.value.code)


def test_envoy_takes_the_picker_tls_directory_only_with_tcp_ports(tls_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as unix:
        envoy_args(["--eds-path", "e.json", "--picker-tls-dir", str(tls_dir)])
    assert "needs --epp-port" in str(unix.value.code)
    with pytest.raises(SystemExit) as missing:
        envoy_args(["--eds-path", "e.json", "--epp-port", "1", "--picker-tls-dir", str(tmp_path)])
    assert "TLS file" in str(missing.value.code)
    o, _ = envoy_args(["--eds-path", "e.json", "--epp-port", "1", "--picker-tls-dir", str(tls_dir)])
    assert o.picker_tls == envoy_files(tls_dir.resolve())


def _cfg(**kw: Any) -> dict[str, Any]:
    return envoy_config(EnvoyOptions(**{"listen_port": 1, "admin_port": 2, "epp_port": (3, 4),
                                        "eds_path": Path("/x/e.json"), **kw}))


def _clusters(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in cfg["static_resources"]["clusters"]}


@pytest.mark.parametrize(("transport", "alpn"), [(PickerTransport.EXT_PROC, "h2"),
                                                  (PickerTransport.EXT_AUTHZ, "http/1.1")])
def test_envoy_reaches_every_picker_listener_with_its_client_certificate_and_checks_the_pickers(
        transport: PickerTransport, alpn: str) -> None:
    files = envoy_files(Path("/t"))
    authz = transport is PickerTransport.EXT_AUTHZ
    clusters = _clusters(_cfg(transport=transport, picker_tls=files, als_port=(5, 6) if authz else ()))
    picker_clusters = [EPP_CLUSTER, *(["gantry_als_0", "gantry_als_1"] if authz else [])]
    for name in picker_clusters:
        sock = clusters[name]["transport_socket"]
        assert sock["typed_config"]["@type"] == TLS_TYPE
        ctx = sock["typed_config"]
        assert ctx["sni"] == PICKER_NAME
        common = ctx["common_tls_context"]
        assert common["alpn_protocols"] == [alpn if name == EPP_CLUSTER else "h2"]
        assert common["tls_certificates"] == [{"certificate_chain": {"filename": str(files.cert)},
                                               "private_key": {"filename": str(files.key)}}]
        assert common["validation_context"] == {"trusted_ca": {"filename": str(files.ca)},
                                                "match_typed_subject_alt_names": [
                                                    {"san_type": "DNS", "matcher": {"exact": PICKER_NAME}}]}
    others = [c for n, c in clusters.items() if n not in picker_clusters]
    assert others and all("transport_socket" not in c for c in others)  # the engines: unchanged


def test_without_picker_tls_no_cluster_has_a_transport_socket() -> None:
    for transport in PickerTransport:
        clusters = _clusters(_cfg(transport=transport, als_port=(5, 6)))
        assert all("transport_socket" not in c for c in clusters.values())


def _handshake(ctx: ssl.SSLContext, client: ssl.SSLContext) -> bool:
    """Whether ``client`` completes a handshake and an exchange with a server using ``ctx`` (loopback)."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        served: list[bool] = []

        def serve() -> None:
            conn, _ = srv.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(tls.recv(1))
                    served.append(True)
            except (ssl.SSLError, OSError):
                served.append(False)

        t = threading.Thread(target=serve)
        t.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                    client.wrap_socket(raw, server_hostname=PICKER_NAME) as tls:
                tls.sendall(b"x")
                echoed = tls.recv(1) == b"x"
        except (ssl.SSLError, OSError):
            echoed = False
        t.join(10)
        return echoed and served == [True]


def _client(ca: Path, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


def test_the_pickers_server_context_admits_only_a_client_certificate_from_its_ca(tls_dir: Path,
                                                                                 other_dir: Path) -> None:
    server = server_context(picker_files(tls_dir))
    envoy, stranger = envoy_files(tls_dir), envoy_files(other_dir)
    assert _handshake(server, _client(envoy.ca, (envoy.cert, envoy.key)))
    assert not _handshake(server, _client(envoy.ca, None))
    assert not _handshake(server, _client(envoy.ca, (stranger.cert, stranger.key)))


async def _until(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll ``cond`` on the loop until it holds (a loaded host may be slow); fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def _secured(port: int, ctx: ssl.SSLContext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=PICKER_NAME),
                                  30)


async def _stats(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dict[str, Any]:
    writer.write(b"GET /stats HTTP/1.1\r\nhost: gantry-picker\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 200")
    length = int(headers_of(head[:-4])["content-length"])
    stats: dict[str, Any] = msgspec.json.decode(await reader.readexactly(length))
    return stats


async def _listener(tls_dir: Path, conns: Connections) -> tuple[asyncio.AbstractServer, int]:
    p, _ = picker(report("a", 8001))
    authz = AuthzPicker(p, conns)
    server = await tcp_http_listener(lambda: OneByOne(authz.answer, unsent=authz.unsent, conns=conns), "127.0.0.1",
                                     0, load_picker_tls(tls_dir), conns)
    return server, server.sockets[0].getsockname()[1]


def test_connections_still_in_their_tls_handshake_count_against_the_cap_and_envoys_keeps_working(
        tls_dir: Path) -> None:
    envoy = envoy_files(tls_dir)
    ctx = _client(envoy.ca, (envoy.cert, envoy.key))

    async def scenario() -> None:
        conns = Connections(idle_timeout_s=60.0, max_connections=4)
        server, port = await _listener(tls_dir, conns)
        stalled: list[socket.socket] = []
        try:
            established = await _secured(port, ctx)  # Envoy's connection, open before the flood
            assert (await _stats(*established))["connections"]["open"] == 1
            # three connections that never send their ClientHello: accepted (in order) before the next one
            stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
            with pytest.raises(OSError):  # ssl.SSLError or a reset: closed at once, before its handshake
                await _secured(port, ctx)
            stats = (await _stats(*established))["connections"]  # Envoy's connection still answered
            assert stats == {"open": 1, "handshaking": 3, "max": 4, "refused": 1, "idle_closed": 0, "held_bytes": 0,
                             "closed_over_held": 0}
            for sock in stalled:
                sock.close()
            await _until(lambda: not conns.handshaking)  # their places are free again
            second = await _secured(port, ctx)
            assert (await _stats(*second))["connections"]["open"] == 2
            for _, writer in (established, second):
                writer.close()
            await _until(lambda: not conns.open)
        finally:
            for sock in stalled:
                sock.close()
            server.close()

    uvloop.run(scenario())


def test_a_stalled_tls_handshake_is_dropped_after_the_handshake_timeout_and_frees_its_place(tls_dir: Path) -> None:
    async def scenario() -> None:
        conns = Connections(idle_timeout_s=60.0, max_connections=1)
        app = lambda: OneByOne(lambda _h, _b: b"", conns=conns)  # noqa: E731
        server = await tls_listener(app, "127.0.0.1", 0, server_context(picker_files(tls_dir)), conns, timeout_s=0.5)
        try:
            with socket.create_connection(("127.0.0.1", server.sockets[0].getsockname()[1])) as sock:
                await _until(lambda: len(conns.handshaking) == 1)
                await _until(lambda: not conns.handshaking)  # dropped by the picker, not by this client
                sock.settimeout(30)
                assert sock.recv(1) == b""  # the picker closed it
            assert conns.refused == 0 and not conns.open
        finally:
            server.close()

    uvloop.run(scenario())
