"""An engine server started by a fleet of a `--tls` stack trusts the stack's CA (it inherits the variable)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from ops.tls import ensure_tls
from services.engine_server.publisher import TLS_CA_ENV, tls_options


def test_the_stack_ca_is_trusted_when_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = ensure_tls(tmp_path)
    monkeypatch.setenv(TLS_CA_ENV, str(files.ca))
    ctx = tls_options()["tls"]
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode is ssl.CERT_REQUIRED
    assert ctx.get_ca_certs(), "the stack's CA is loaded"


def test_no_ca_named_means_no_tls_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TLS_CA_ENV, raising=False)
    assert tls_options() == {}
