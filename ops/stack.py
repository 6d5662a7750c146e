"""The local stack behind ``gantry up``: real NATS + Redis, the placement services, emulated workers.

Everything is a child process started from the same commands docker-compose runs
(``services.SERVICE_COMMANDS``), configured through the same ``GANTRY_*`` environment variables.
Server data and every process's log live under the project-local ``shared.paths.runtime_dir()``.
Children run in their own sessions so that the launcher alone decides the shutdown order
(workers, then services, then servers) and a Ctrl-C in the terminal reaches only the launcher; on
Linux they also get SIGTERM if the launcher itself dies, so nothing is ever left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ops.servers import COLOCATED_NATS_CPUS, ServerProcess, ServerStartError, free_port, start_nats, start_redis
from shared.core.placement.domain import GIB
from shared.paths import REPO_ROOT, runtime_dir
from shared.settings import Settings

PLACEMENT_SERVICES: tuple[str, ...] = ("filter", "fitting", "scoring", "reconciler")
WORKERS_SERVICE = "workers"
STATE_FILE = "stack.json"


class StackError(RuntimeError):
    """The stack cannot start (port taken, a binary missing, a child exiting at once)."""


@dataclass(frozen=True)
class WorkerFleet:
    """How many emulated workers to run and what GPUs each has."""

    count: int = 0
    gpus: int = 8
    gpu_type: str = "H100-SXM-80GB"
    labels: tuple[str, ...] = ()  # "key=value", given to every worker


@dataclass
class Child:
    """One service process of the stack."""

    name: str
    argv: list[str]
    process: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        """True while the process has not exited."""
        return self.process.poll() is None


def service_argv(name: str, commands: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """The argv of service ``name`` as docker-compose runs it, with ``python`` bound to this interpreter."""
    if commands is None:
        from services import SERVICE_COMMANDS

        commands = SERVICE_COMMANDS
    if name not in commands:
        raise StackError(f"no service named {name!r} (known: {', '.join(sorted(commands))})")
    argv = list(commands[name])
    if argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv


def worker_argv(fleet: WorkerFleet, base: Sequence[str] | None = None) -> list[str]:
    """The emulated-workers command with the fleet's shape as flags (VRAM from the GPU catalogue)."""
    if base is None:
        from services import WORKERS_COMMAND

        base = WORKERS_COMMAND
    argv = list(base)
    if argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return [
        *argv,
        "--count", str(fleet.count),
        "--gpus", str(fleet.gpus),
        "--gpu-product", fleet.gpu_type,
        "--vram-gib", f"{gpu_vram_gib(fleet.gpu_type):g}",
        *(arg for label in fleet.labels for arg in ("--label", label)),
    ]


def gpu_vram_gib(gpu_type: str) -> float:
    """Memory of a GPU product in GiB, from the reference GPU catalogue."""
    from shared.catalog import UnknownGpuError, gpu_names, load_gpu_spec

    try:
        return load_gpu_spec(gpu_type).mem_bytes / GIB
    except UnknownGpuError:
        raise StackError(f"unknown GPU type {gpu_type!r} (known: {', '.join(gpu_names())})") from None


def url_port(url: str, default: int) -> int:
    """The port of a server URL (``nats://host:4222``), or ``default`` when it names none."""
    return urlsplit(url).port or default


def url_password(url: str) -> str | None:
    """The password embedded in a Redis URL, if any."""
    return urlsplit(url).password


def port_in_use(port: int) -> bool:
    """True if something already accepts connections on the loopback ``port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.3)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _load_libc() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


# Loaded once here so the pre-exec hook below only makes one foreign call (nothing that takes locks).
_LIBC = _load_libc()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the launcher dies (Linux), never leave orphans."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)  # type: ignore[attr-defined]


@dataclass
class LocalStack:
    """Starts and stops the whole local stack; use as a context manager or call start()/stop()."""

    settings: Settings
    fleet: WorkerFleet = field(default_factory=WorkerFleet)
    home: Path = field(default_factory=runtime_dir)
    services: tuple[str, ...] = PLACEMENT_SERVICES
    commands: Mapping[str, Sequence[str]] | None = None
    workers_command: Sequence[str] | None = None
    nats: ServerProcess | None = None
    redis: ServerProcess | None = None
    children: list[Child] = field(default_factory=list)
    # Each service's /metrics port: free ports, kept across restarts, so several stacks can coexist.
    metrics_ports: dict[str, int] = field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        """Where every child's stdout/stderr goes."""
        return self.home / "logs"

    def start(self) -> LocalStack:
        """Servers first, then services, then workers; on any failure, stop what started and raise."""
        try:
            self.start_servers()
            for name in self.services:
                self.spawn(name, service_argv(name, self.commands))
            if self.services:
                # Workers register once at start: they must find the services already listening.
                asyncio.run(self.wait_services_ready())
            if self.fleet.count > 0:
                self.spawn(WORKERS_SERVICE, worker_argv(self.fleet, self.workers_command))
            self.write_state()
        except BaseException:
            self.stop()
            raise
        return self

    def start_servers(self) -> None:
        """Start NATS (JetStream) and Redis on the ports the settings name."""
        nats_port = url_port(self.settings.nats_url, 4222)
        redis_port = url_port(self.settings.redis_url, 6379)
        for what, port, env in (
            ("NATS", nats_port, "GANTRY_NATS_URL"),
            ("Redis", redis_port, "GANTRY_REDIS_URL"),
        ):
            if port_in_use(port):
                raise StackError(
                    f"{what} port {port} is already in use (another `gantry up`?); "
                    f"stop it with `gantry down` or choose another port with {env}"
                )
        try:
            self.nats = start_nats(self.home / "nats", port=nats_port, cpus=COLOCATED_NATS_CPUS)
            self.redis = start_redis(
                self.home / "redis", port=redis_port, password=url_password(self.settings.redis_url)
            )
        except ServerStartError as err:
            raise StackError(str(err)) from None

    async def wait_services_ready(self, timeout: float = 60.0) -> None:
        """Until every durable consumer of the services is pulling (or a child dies: StackError)."""
        import nats
        from nats.js.errors import NotFoundError

        from shared.bus import streams

        wanted = [(stream, durable) for stream, durable, _ in streams.ALL_CONSUMERS]
        nc = await nats.connect(self.settings.nats_url, connect_timeout=5)
        try:
            js = nc.jetstream()
            deadline = time.monotonic() + timeout
            while wanted:
                for child in self.dead_children():
                    raise StackError(
                        f"{child.name} exited with code {child.process.returncode} at start-up; "
                        f"see {child.log_path}"
                    )
                if time.monotonic() > deadline:
                    names = ", ".join(consumer for _, consumer in wanted)
                    raise StackError(f"services not ready within {timeout:.0f}s (waiting for {names})")
                still = []
                for stream, consumer in wanted:
                    try:
                        info = await js.consumer_info(stream, consumer)
                    except (NotFoundError, nats.errors.TimeoutError):
                        still.append((stream, consumer))
                        continue
                    if not info.num_waiting:
                        still.append((stream, consumer))
                wanted = still
                if wanted:
                    await asyncio.sleep(0.2)
        finally:
            await nc.close()

    def child_env(self) -> dict[str, str]:
        """The environment every child gets: this one plus the stack's GANTRY_* settings."""
        env = dict(os.environ)
        for name, value in self.settings.model_dump().items():
            env[f"GANTRY_{name.upper()}"] = str(value)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def spawn(self, name: str, argv: list[str]) -> Child:
        """Start one child with its output in ``logs/<name>.log``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        env = self.child_env()
        if name in self.services:
            env["GANTRY_METRICS_PORT"] = str(self.metrics_ports.setdefault(name, free_port()))
        with log.open("ab") as out:
            out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        child = Child(name, argv, proc, log)
        self.children.append(child)
        return child

    def dead_children(self) -> list[Child]:
        """Children that have exited (a healthy stack has none)."""
        return [child for child in self.children if not child.alive()]

    def servers_alive(self) -> bool:
        """True while both servers run."""
        return bool(self.nats and self.nats.alive() and self.redis and self.redis.alive())

    def stop(self, timeout: float = 5.0) -> None:
        """Stop workers, then services (SIGTERM, then SIGKILL after ``timeout``), then the servers."""
        workers = [c for c in self.children if c.name == WORKERS_SERVICE]
        services = [c for c in self.children if c.name != WORKERS_SERVICE]
        for group in (workers, services):
            _terminate(group, timeout)
        for server in (self.redis, self.nats):
            if server is not None:
                server.stop()
        self.children.clear()
        with contextlib.suppress(OSError):
            (self.home / STATE_FILE).unlink()

    def pids(self) -> Iterator[int]:
        """Every process id of the stack (servers and children)."""
        for server in (self.nats, self.redis):
            if server is not None:
                yield server.process.pid
        for child in self.children:
            yield child.process.pid

    def write_state(self) -> None:
        """Record the launcher's pid and URLs so `gantry down` can find this stack."""
        self.home.mkdir(parents=True, exist_ok=True)
        state = {
            "pid": os.getpid(),
            "nats_url": self.settings.nats_url,
            "children": {c.name: c.process.pid for c in self.children},
            "servers": {s.name: s.process.pid for s in (self.nats, self.redis) if s is not None},
            "metrics": {name: f"http://127.0.0.1:{port}/metrics" for name, port in self.metrics_ports.items()},
        }
        (self.home / STATE_FILE).write_text(json.dumps(state, indent=2))

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _terminate(children: list[Child], timeout: float) -> None:
    for child in children:
        if child.alive():
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait(5)


def read_state(home: Path | None = None) -> dict[str, object] | None:
    """The running stack's state file, or None when no stack recorded one."""
    path = (home or runtime_dir()) / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def signal_running_stack(home: Path | None = None, sig: int = signal.SIGINT) -> int | None:
    """Send ``sig`` to the launcher recorded in the state file; its pid, or None if none runs."""
    state = read_state(home)
    if not state or not isinstance(state.get("pid"), int):
        return None
    pid: int = state["pid"]  # type: ignore[assignment]  # checked to be an int above
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return None
    return pid
