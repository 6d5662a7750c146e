"""`gantry up` itself: a clean Ctrl-C shutdown of every process, and a clear refusal of taken ports."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pexpect
import pytest

from ops.servers import free_port
from tests.integration.cli.conftest import GANTRY, Stack, drain, run_cli, spawn, stack_env

DEMO = Path(__file__).resolve().parents[3] / "ops" / "demo"

pytestmark = pytest.mark.integration


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has exited all the same.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_ctrl_c_stops_servers_services_and_workers(tmp_path: Path) -> None:
    env = stack_env(tmp_path, free_port(), free_port())
    child = spawn(["up", "--workers", "1", "--gpus", "2"], env, timeout=90)
    child.expect("stack is up: 1 worker\\(s\\) READY")
    state = json.loads((tmp_path / "stack.json").read_text())
    pids = [*state["children"].values(), *state["servers"].values()]
    try:
        assert sorted(state["children"]) == ["envoy", "filter", "fitting", "gateway", "reconciler", "scoring",
                                             "workers"]
        assert state["gateway"]["url"].startswith("http://127.0.0.1:")
        assert all(alive(pid) for pid in pids)
        child.sendintr()
        child.expect("stopping the stack", timeout=10)
        child.expect("stopped", timeout=30)
        child.expect(pexpect.EOF, timeout=10)
        child.close()
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [pid for pid in pids if alive(pid)] == []
    finally:  # a failed run must not leave its servers behind for the rest of the suite
        child.close(force=True)
        for pid in pids:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert not (tmp_path / "stack.json").exists()
    assert (tmp_path / "logs" / "reconciler.log").exists()
    assert (tmp_path / "redis" / "appendonly.aof").exists() or (tmp_path / "redis" / "appendonlydir").exists()


def test_up_refuses_ports_that_are_taken(stack: Stack, tmp_path: Path) -> None:
    env = {**stack.env, "GANTRY_HOME": str(tmp_path)}
    proc = subprocess.run([GANTRY, "up"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    port = stack.env["GANTRY_NATS_URL"].rsplit(":", 1)[1]
    assert f"error: NATS port {port} is already in use" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_up_rejects_an_unknown_gpu_type(tmp_path: Path) -> None:
    env = stack_env(tmp_path, free_port(), free_port())
    proc = subprocess.run(
        [GANTRY, "up", "--workers", "1", "--gpu-type", "Z9000"], env=env, capture_output=True, text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown GPU type 'Z9000'" in proc.stderr


def test_a_crashed_service_is_restarted(stack: Stack) -> None:
    def scoring_pid() -> int:
        return int(json.loads((stack.home / "stack.json").read_text())["children"]["scoring"])

    killed = scoring_pid()
    os.kill(killed, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while "scoring exited with code -9; restarting" not in stack.output() or scoring_pid() == killed:
        assert time.monotonic() < deadline, stack.output()[-2000:]
        time.sleep(0.2)
    assert alive(scoring_pid())


def test_a_crashed_server_is_restarted_and_a_model_deployed_after_it_runs(tmp_path: Path) -> None:
    env = stack_env(tmp_path, free_port(), free_port())
    child = spawn(["up", "--workers", "1", "--gpus", "2", "--no-gateway"], env, timeout=90)
    log = tmp_path / "up-output.txt"
    child.logfile_read = log.open("w", encoding="utf-8")
    child.expect("stack is up: 1 worker\\(s\\) READY")
    reader = threading.Thread(target=drain, args=(child,), daemon=True)
    reader.start()

    def server_pid(which: str) -> int:
        return int(json.loads((tmp_path / "stack.json").read_text())["servers"][which])

    try:
        for which in ("nats", "redis"):
            killed = server_pid(which)
            os.kill(killed, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while f"{which} exited with code -9; restarting" not in log.read_text() or server_pid(which) == killed:
                assert time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.2)
            assert alive(server_pid(which))
        spec = tmp_path / "m.yaml"
        spec.write_text((DEMO / "llama-8b.yaml").read_text().replace("replicas: 2", "replicas: 1"))
        deployed = run_cli(["deploy", str(spec), "--wait"], env)
        assert deployed.code == 0, deployed.err + log.read_text()[-2000:]
        assert "llama-8b: 1/1 RUNNING" in deployed.out
        assert run_cli(["down"], env).code == 0
        reader.join(timeout=40)
    finally:
        child.close(force=True)
        child.logfile_read.close()


def test_demo_without_workers_is_refused_before_anything_starts(tmp_path: Path) -> None:
    env = stack_env(tmp_path, free_port(), free_port())
    proc = subprocess.run([GANTRY, "up", "--demo"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--demo needs workers" in proc.stderr
    assert not (tmp_path / "logs").exists()


# -- launcher safety (issue 12, case 9) ------------------------------------------------------------------


def test_a_second_up_on_the_same_home_is_refused_and_leaves_the_running_stack_alone(stack: Stack) -> None:
    before = (stack.home / "stack.json").read_text()
    proc = subprocess.run([GANTRY, "up"], env=stack.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "another `gantry up`" in proc.stderr and "Traceback" not in proc.stderr
    assert (stack.home / "stack.json").read_text() == before  # `gantry down` still finds the stack


def test_fresh_beside_a_running_stack_is_refused_and_wipes_nothing(stack: Stack) -> None:
    data = sorted(str(p) for sub in ("nats", "redis") for p in (stack.home / sub).rglob("*"))
    assert data
    proc = subprocess.run([GANTRY, "up", "--fresh"], env=stack.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert sorted(str(p) for sub in ("nats", "redis") for p in (stack.home / sub).rglob("*")) == data
    assert json.loads((stack.home / "stack.json").read_text())["pid"] == stack.process.pid


def test_down_stops_an_up_running_in_the_background(tmp_path: Path) -> None:
    env = stack_env(tmp_path, free_port(), free_port())
    # A script's `gantry up &` ignores SIGINT (the shell set it so): down must still stop it. A shell ignores it and
    # execs `gantry up` in its place (an ignored signal stays ignored across exec), as such a script does; no
    # preexec_fn, which would fork this process (threads and fork handlers and all).
    proc = subprocess.Popen(
        ["sh", "-c", 'trap "" INT; exec "$@"', "sh", GANTRY, "up"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "stops everything" in line:
                break
        assert _ignores_sigint(proc.pid)
        down = subprocess.run([GANTRY, "down"], env=env, capture_output=True, text=True, timeout=90)
        assert down.returncode == 0, down.stderr
        assert f"stopped gantry up (pid {proc.pid})" in down.stdout
        assert proc.wait(5) == 0
        assert not (tmp_path / "stack.json").exists()
    finally:
        proc.kill()
        proc.wait()


def _ignores_sigint(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    ignored = int(next(line for line in status if line.startswith("SigIgn:")).split()[1], 16)
    return bool(ignored & (1 << (signal.SIGINT - 1)))
