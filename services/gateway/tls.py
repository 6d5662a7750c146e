"""Mutual TLS on the picker's TCP listeners (Envoy in another container), opt-in with ``--tls-dir``.

Over TCP anyone who reaches the port could send checks (booking load on endpoints) or access-log entries
(ending requests). With a TLS directory both listeners (gRPC: ext_proc, access log, health; HTTP/1.1: ext_authz)
accept only a client whose certificate the directory's CA signed: Envoy's, issued with the picker's own
(``python -m ops.tls picker DIR`` writes all five files; an operator may put their own there instead).

The unix sockets (the default) take no TLS: who may connect is already who may open the socket (its user), so
the handshake and per-message encryption would cost every check and protect nothing.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from shared.paths import TlsFiles

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
    context: ssl.SSLContext


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
    return PickerTls(files.cert.read_bytes(), files.key.read_bytes(), files.ca.read_bytes(), context)
