"""The container health check recognises its service as the container's main process."""

from __future__ import annotations

import socket
from pathlib import Path

from ops.healthcheck import accepts, main, main_process_runs


def cmdline(tmp_path: Path, *argv: str) -> Path:
    path = tmp_path / "cmdline"
    path.write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    return path


def test_main_process_of_the_named_service_is_recognised(tmp_path: Path) -> None:
    assert main_process_runs("fitting", cmdline(tmp_path, "python", "-m", "services.fitting"))


def test_another_service_is_not_this_one(tmp_path: Path) -> None:
    assert not main_process_runs("fitting", cmdline(tmp_path, "python", "-m", "services.filter"))


def test_unreadable_cmdline_is_unhealthy(tmp_path: Path) -> None:
    assert not main_process_runs("filter", tmp_path / "missing")


def test_usage_error_without_a_service_name() -> None:
    assert main([]) == 2


def test_a_service_that_does_not_listen_yet_is_unhealthy(tmp_path: Path) -> None:
    sock_path = tmp_path / "grpc.sock"
    assert main(["gateway", "--listening", str(sock_path)]) == 1  # before its process or servers are looked at
    assert accepts(sock_path) is not None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(sock_path))
        server.listen()
        assert accepts(sock_path) is None
