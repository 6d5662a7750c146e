"""Mutual TLS on the picker's TCP listeners (Envoy in another container), opt-in with ``--tls-dir``.

Over TCP anyone who reaches the port could send checks (booking load on endpoints) or access-log entries
(ending requests). With a TLS directory both listeners (gRPC: ext_proc, access log, health; HTTP/1.1: ext_authz)
accept only a client whose certificate the directory's CA signed: Envoy's, issued with the picker's own
(``python -m ops.tls picker DIR`` writes all five files; an operator may put their own there instead).

The unix sockets (the default) take no TLS: who may connect is already who may open the socket (its user), so
the handshake and per-message encryption would cost every check and protect nothing.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.gateway.http1 import Connections, Swept
from shared.paths import TlsFiles

log = logging.getLogger("gantry.gateway")

CA_FILE = "ca.pem"
PICKER_CERT = "picker.pem"
PICKER_KEY = "picker-key.pem"
ENVOY_CERT = "envoy.pem"
ENVOY_KEY = "envoy-key.pem"
PICKER_NAME = "gantry-picker"
"""The DNS name in the picker's certificate: Envoy sends it as SNI and accepts no other subject (the picker is
reached by address, whatever its container is called)."""
HANDSHAKE_TIMEOUT_S = 10.0  # a connection that has not finished its handshake by then is dropped


class TlsError(ValueError):
    """A TLS directory the picker or Envoy cannot use (a file missing, unreadable or not matching)."""


def picker_files(tls_dir: Path) -> TlsFiles:
    """The picker's side of a TLS directory."""
    return TlsFiles(cert=tls_dir / PICKER_CERT, key=tls_dir / PICKER_KEY, ca=tls_dir / CA_FILE)


def envoy_files(tls_dir: Path) -> TlsFiles:
    """Envoy's side of a TLS directory (its client certificate)."""
    return TlsFiles(cert=tls_dir / ENVOY_CERT, key=tls_dir / ENVOY_KEY, ca=tls_dir / CA_FILE)


def present(files: TlsFiles) -> TlsFiles:
    """``files`` when all three are readable files; raises TlsError naming the first that is not."""
    for path in (files.cert, files.key, files.ca):
        try:
            with path.open("rb"):
                pass
        except OSError as err:
            raise TlsError(f"TLS file {path}: {err.strerror or err}") from None
    return files


@dataclass(frozen=True, slots=True)
class PickerTls:
    """The picker's TLS material, checked: the PEM bytes for gRPC, a server context for the HTTP listener."""

    cert: bytes
    key: bytes
    ca: bytes
    context: ssl.SSLContext  # the HTTP/1.1 listener's (ext_authz checks)
    h2_context: ssl.SSLContext  # the gRPC listener's: the same, with h2 offered in ALPN (gRPC clients require it)


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """A TLS server context that requires a client certificate signed by ``files.ca``; raises TlsError when
    the files do not load (bad PEM, a key not matching its certificate)."""
    present(files)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(files.cert, files.key)
        ctx.load_verify_locations(cafile=files.ca)
    except (ssl.SSLError, ValueError) as err:
        raise TlsError(f"TLS files in {files.cert.parent} do not load: {err}") from None
    return ctx


def load_picker_tls(tls_dir: Path) -> PickerTls:
    """The picker's TLS from ``tls_dir`` (CA_FILE, PICKER_CERT, PICKER_KEY); raises TlsError."""
    files = picker_files(tls_dir)
    context = server_context(files)
    h2_context = server_context(files)
    h2_context.set_alpn_protocols(["h2"])
    return PickerTls(files.cert.read_bytes(), files.key.read_bytes(), files.ca.read_bytes(), context, h2_context)


class TlsListener:
    """A TCP listener whose connections are secured one by one (``ssl.SSLContext``, the loop's own TLS, as
    ``create_server(ssl=...)`` would): each counts under ``conns``'s cap from its accept, through its handshake
    (``Connections.handshake_begins``), so stalled handshakes cannot hold descriptors past the cap. With
    ``create_server(ssl=...)`` the application saw a connection only once its handshake ended: up to
    ``timeout_s`` each, any number of them were outside the cap. After the handshake the connection is its
    ``app``'s as before (the check path is unchanged)."""

    RETRY_ACCEPT_S = 0.1  # out of descriptors: accept again after this (the cap's slack is what frees them)

    def __init__(self, sock: socket.socket, app: Callable[[], Swept], context: ssl.SSLContext, conns: Connections,
                 timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
        self.sockets = [sock]
        self.app = app
        self.context = context
        self.conns = conns
        self.timeout_s = timeout_s
        self._tasks: set[asyncio.Task[None]] = set()  # the accept loop and each handshake (the loop holds tasks weakly)
        self._run(self._accept_forever())

    def _run(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(self.sockets[0])
            except OSError as err:  # EMFILE and the like: the listener stays
                log.warning("ext_authz: accept failed (%s); again in %g s", err, self.RETRY_ACCEPT_S)
                await asyncio.sleep(self.RETRY_ACCEPT_S)
                continue
            conn = self.app()
            if not self.conns.handshake_begins(conn):
                sock.close()  # at the cap: closed before a byte of TLS
                continue
            self._run(self._secure(sock, conn))

    async def _secure(self, sock: socket.socket, conn: Swept) -> None:
        """The handshake; ``conn`` is told of the connection (and ``admit``-s it) when it succeeds."""
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: conn, sock, ssl=self.context, ssl_handshake_timeout=self.timeout_s)
        except Exception as err:  # refused, timed out or reset: the loop closed the connection
            log.debug("ext_authz TLS handshake failed: %r", err)
        finally:
            self.conns.handshake_ends(conn)

    def close(self) -> None:
        """Stop listening; handshakes in progress are abandoned (their connections closed)."""
        for task in list(self._tasks):
            task.cancel()
        self.sockets[0].close()


async def tls_listener(app: Callable[[], Swept], host: str, port: int, context: ssl.SSLContext,
                       conns: Connections, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> TlsListener:
    """A ``TlsListener`` on ``host``:``port`` (0: any free port), listening when this returns."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.create_server(address[:2], family=family, backlog=100)  # SO_REUSEADDR, as create_server sets it
    sock.setblocking(False)
    return TlsListener(sock, app, context, conns, timeout_s)
