"""With no stack running, every command says so in one line and exits 1: no hang, no traceback."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ops.servers import free_port
from tests.integration.cli.conftest import GANTRY, run_cli, stack_env

pytestmark = pytest.mark.integration

COMMANDS = [
    ["models"], ["models", "--json"], ["instances"], ["workers", "--json"], ["explain", "m"],
    ["scale", "m", "2"], ["cordon", "w0"], ["uncordon", "w0:1"], ["events"], ["events", "--follow"],
    ["top", "--once"], ["top"],
]


@pytest.fixture(scope="module")
def dead_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Settings that point at ports nothing listens on."""
    return stack_env(tmp_path_factory.mktemp("nostack"), free_port(), free_port())


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_command_reports_the_stack_is_not_running(dead_env: dict[str, str], args: list[str]) -> None:
    result = run_cli(args, dead_env)
    assert result.code == 1
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("error: cannot reach ")
    assert "(connection refused): is the stack running? start it with `gantry up`" in lines[0]


def test_deploy_validates_the_file_before_it_needs_the_stack(dead_env: dict[str, str], tmp_path: Path) -> None:
    spec = tmp_path / "m.yaml"
    spec.write_text("name: m\nsource: Qwen/Qwen3-8B\nreplicas: 1\n")  # valid and sizable: only the stack is missing
    result = run_cli(["deploy", str(spec)], dead_env)
    assert result.code == 1 and "cannot reach" in result.err
    spec.write_text("name: m\nreplicas: -3\n")
    assert run_cli(["deploy", str(spec)], dead_env).code == 2


def test_redis_password_never_reaches_the_terminal(dead_env: dict[str, str]) -> None:
    env = {**dead_env, "GANTRY_REDIS_URL": dead_env["GANTRY_REDIS_URL"].replace("//", "//cli:cli-test-pw@", 1)}
    result = run_cli(["models"], env)
    assert "cli-test-pw" not in result.err and ":***@" in result.err


def test_console_script_prints_one_line_without_traceback(dead_env: dict[str, str]) -> None:
    proc = subprocess.run([GANTRY, "workers"], env=dead_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_down_without_a_stack_is_an_error(dead_env: dict[str, str]) -> None:
    result = run_cli(["down"], dead_env)
    assert result.code == 1 and "no running stack found" in result.err


def test_invalid_setting_from_the_environment_exits_2(dead_env: dict[str, str]) -> None:
    result = run_cli(["models"], {**dead_env, "GANTRY_NOT_READY_AFTER_S": "soon"})
    assert result.code == 2
    assert result.err.startswith("error: invalid setting GANTRY_NOT_READY_AFTER_S")
