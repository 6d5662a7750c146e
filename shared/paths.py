"""Where Gantry finds the repository, its local runtime folder and the reference data."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The reference data folder (model configs, GPU specs, traces).

    ``GANTRY_DATA_DIR`` wins; otherwise the ``shared/data`` folder that sits beside the repository.
    """
    env = os.environ.get("GANTRY_DATA_DIR")
    if env:
        return Path(env)
    return REPO_ROOT.parent / "shared" / "data"


def runtime_dir() -> Path:
    """Project-local folder for the local stack's server data and logs (git-ignored)."""
    env = os.environ.get("GANTRY_HOME")
    return Path(env) if env else REPO_ROOT / ".gantry"


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A certificate, its key and the CA whose signature a peer must bear (PEM files): NATS's server side, the
    picker's server side, Envoy's client side."""

    cert: Path
    key: Path
    ca: Path


TLS_DIR = "tls"  # in a stack home


def tls_files(home: Path) -> TlsFiles:
    """Where a stack home keeps its CA, certificate and key."""
    base = home / TLS_DIR
    return TlsFiles(cert=base / "server.pem", key=base / "server-key.pem", ca=base / "ca.pem")
