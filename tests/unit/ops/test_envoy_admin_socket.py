"""Envoy's admin socket: one left by an Envoy that is gone is removed before the start; one a live Envoy answers
on (another sharing the workdir) is left alone and the start refused."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import pytest

from ops.envoy import _stale_socket_removed
from ops.servers import ServerStartError


def test_a_live_admin_socket_is_not_taken_over_and_a_dead_one_is_removed() -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as d, socket.socket(socket.AF_UNIX) as live:
        admin = Path(d) / "envoy" / "admin.sock"
        admin.parent.mkdir()
        live.bind(str(admin))
        live.listen()
        with pytest.raises(ServerStartError, match="another server listens"):
            _stale_socket_removed(admin)
        assert admin.is_socket()
        live.close()  # its Envoy is gone: the socket file stays behind
        _stale_socket_removed(admin)
        assert not admin.exists()
