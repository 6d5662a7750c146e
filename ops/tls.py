"""TLS for the local stack: a private CA and a server certificate, generated once (or the operator's own files).

``gantry up --tls`` calls ``ensure_tls(home)``: files already in ``home/tls`` (``ca.pem``, ``server.pem``,
``server-key.pem``) are used as they are, so an operator may put certificates from their own CA there; otherwise
they are generated with the ``cryptography`` package (an optional dependency: without it, a clear error).

``python -m ops.tls picker DIR`` (``ensure_picker_tls``) writes the directory for mutual TLS between Envoy and the
picker over TCP (services.gateway.tls): a CA of its own, the picker's certificate and Envoy's client certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

from ops.auth import AuthError, write_private
from services.gateway.tls import (
    CA_FILE,
    ENVOY_CERT,
    ENVOY_KEY,
    PICKER_CERT,
    PICKER_KEY,
    PICKER_NAME,
    envoy_files,
    picker_files,
)
from shared.paths import TlsFiles, tls_files

VALID_DAYS = 825  # the longest validity macOS and browsers accept for a server certificate
SERVER_NAMES = ("localhost", "nats", "redis")
SERVER_IPS = ("127.0.0.1", "::1")


def ensure_tls(home: Path) -> TlsFiles:
    """The home's TLS files, generated on first use (keys 0600)."""
    files = tls_files(home)
    if files.cert.exists() and files.key.exists() and files.ca.exists():
        return files
    issuer = _Issuer.new(f"--tls needs the cryptography package (pip install cryptography), or your own ca.pem, "
                         f"server.pem and server-key.pem in {files.ca.parent}")
    write_private(files.ca, issuer.ca_pem())
    issuer.issue(files.cert, files.key, "gantry-server", SERVER_NAMES, SERVER_IPS, server=True)
    return files


def ensure_picker_tls(tls_dir: Path) -> None:
    """A picker's TLS directory (services.gateway.tls): a CA of its own, the picker's server certificate (its
    name ``PICKER_NAME``) and Envoy's client certificate, generated when none of the files is there (keys 0600);
    kept as it is when all are. Some but not all there (an operator's own files, or one side's copy) raises
    AuthError: generating would replace a CA and certificates someone else relies on. The CA's key is not kept:
    issuing another client later means a new directory, given to both sides."""
    tls_dir.mkdir(parents=True, exist_ok=True)
    picker, envoy = picker_files(tls_dir), envoy_files(tls_dir)
    there = [p.exists() for p in (picker.cert, picker.key, envoy.cert, envoy.key, picker.ca)]
    if all(there):
        return
    if any(there):
        raise AuthError(f"{tls_dir} holds some of {CA_FILE}, {PICKER_CERT}, {PICKER_KEY}, {ENVOY_CERT} and "
                        f"{ENVOY_KEY} but not all: not replacing them (complete them, or use an empty directory)")
    issuer = _Issuer.new(f"picker TLS needs the cryptography package (pip install cryptography), or your own "
                         f"{CA_FILE}, {PICKER_CERT}, {PICKER_KEY}, {ENVOY_CERT} and {ENVOY_KEY} in {tls_dir}")
    write_private(picker.ca, issuer.ca_pem())
    issuer.issue(picker.cert, picker.key, PICKER_NAME, (PICKER_NAME,), (), server=True)
    issuer.issue(envoy.cert, envoy.key, "gantry-envoy", (), (), server=False)


class _Issuer:
    """A fresh private CA that signs leaf certificates (``cryptography``, imported only when one is made)."""

    def __init__(self, key: Any, cert: Any) -> None:
        self.key, self.cert = key, cert

    @classmethod
    def new(cls, missing: str) -> _Issuer:
        """A new CA; raises AuthError(``missing``) without the cryptography package."""
        try:
            from cryptography import x509
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.asymmetric import ec
            from cryptography.x509.oid import NameOID
        except ImportError:
            raise AuthError(missing) from None
        now = datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Gantry local CA")])
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def ca_pem(self) -> str:
        """The CA's certificate (PEM)."""
        from cryptography.hazmat.primitives import serialization
        return str(self.cert.public_bytes(serialization.Encoding.PEM).decode())

    def issue(self, cert_path: Path, key_path: Path, common_name: str, dns: tuple[str, ...],
              ips: tuple[str, ...], server: bool) -> None:
        """Write a new key and a certificate for it signed by this CA: a server's (names ``dns`` and ``ips``)
        or a client's."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
        now = datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                  else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        pem = serialization.Encoding.PEM
        private = serialization.PrivateFormat.PKCS8
        write_private(key_path, key.private_bytes(pem, private, serialization.NoEncryption()).decode())
        write_private(cert_path, cert.public_bytes(pem).decode())


def main(argv: list[str] | None = None) -> None:
    """``python -m ops.tls picker DIR``: generate a picker's TLS directory (and Envoy's client certificate)."""
    import argparse
    import sys
    p = argparse.ArgumentParser(prog="python -m ops.tls", description=main.__doc__)
    p.add_argument("what", choices=["picker"])
    p.add_argument("dir", type=Path, help="give it to the picker's --tls-dir and Envoy's --picker-tls-dir")
    a = p.parse_args(argv)
    try:
        ensure_picker_tls(a.dir)
    except (AuthError, OSError) as err:
        sys.exit(f"{p.prog}: error: {err}")


if __name__ == "__main__":
    main()
