"""TLS for the local stack: a private CA and a server certificate, generated once (or the operator's own files).

``gantry up --tls`` calls ``ensure_tls(home)``: files already in ``home/tls`` (``ca.pem``, ``server.pem``,
``server-key.pem``) are used as they are, so an operator may put certificates from their own CA there; otherwise
they are generated with the ``cryptography`` package (an optional dependency: without it, a clear error).
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from ops.auth import AuthError, TlsFiles, write_private

TLS_DIR = "tls"
VALID_DAYS = 825  # the longest validity macOS and browsers accept for a server certificate
SERVER_NAMES = ("localhost", "nats", "redis")
SERVER_IPS = ("127.0.0.1", "::1")


def tls_files(home: Path) -> TlsFiles:
    """Where a stack home keeps its CA, certificate and key."""
    base = home / TLS_DIR
    return TlsFiles(cert=base / "server.pem", key=base / "server-key.pem", ca=base / "ca.pem")


def ensure_tls(home: Path) -> TlsFiles:
    """The home's TLS files, generated on first use (keys 0600)."""
    files = tls_files(home)
    if files.cert.exists() and files.key.exists() and files.ca.exists():
        return files
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        raise AuthError(
            "--tls needs the cryptography package (pip install cryptography), or your own ca.pem, server.pem "
            f"and server-key.pem in {files.ca.parent}"
        ) from None
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Gantry local CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVER_NAMES]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in SERVER_IPS]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gantry-server")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    private = serialization.PrivateFormat.PKCS8
    write_private(files.key, key.private_bytes(pem, private, serialization.NoEncryption()).decode())
    write_private(files.cert, cert.public_bytes(pem).decode())
    write_private(files.ca, ca.public_bytes(pem).decode())
    return files
