"""The container health check recognises its service as the container's main process."""

from __future__ import annotations

from pathlib import Path

from ops.healthcheck import main, main_process_runs


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
