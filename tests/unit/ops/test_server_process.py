"""Stopping a server the launcher or a test started: graceful first, also when the server is frozen."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from ops.servers import ServerProcess

# Exits 0 on SIGTERM (a graceful stop), so the exit code tells a SIGTERM taken from the fallback SIGKILL.
GRACEFUL = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); "
            "print('up', flush=True); time.sleep(60)")


def _started(tmp_path: Path) -> ServerProcess:
    proc = subprocess.Popen([sys.executable, "-c", GRACEFUL], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"  # its handler is in place
    return ServerProcess("test", "", 0, proc, tmp_path / "log")


def test_a_frozen_server_is_stopped_gracefully_without_waiting_out_the_timeout(tmp_path: Path) -> None:
    server = _started(tmp_path)
    server.process.send_signal(signal.SIGSTOP)  # a test standing it in for a host that stopped answering
    started = time.monotonic()
    server.stop(timeout=30)
    assert server.process.returncode == 0  # it took the SIGTERM: not killed after the timeout
    assert time.monotonic() - started < 15


def test_a_running_server_is_stopped_gracefully(tmp_path: Path) -> None:
    server = _started(tmp_path)
    server.stop(timeout=30)
    assert server.process.returncode == 0


def test_a_server_that_does_not_listen_in_time_is_stopped_not_left_running(tmp_path: Path) -> None:
    import pytest

    from ops.servers import ServerStartError, free_port, wait_for_port

    proc = subprocess.Popen([sys.executable, "-c", GRACEFUL], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    try:
        with pytest.raises(ServerStartError, match="did not listen"):
            wait_for_port(free_port(), proc, 0.3, tmp_path / "log")
        assert proc.poll() is not None  # (it took the SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
