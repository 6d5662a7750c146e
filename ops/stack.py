"""The local stack behind ``gantry up``: real NATS + Redis, the placement services, emulated workers, and
(``gateway``) the gateway: Gantry's endpoint picker and Envoy in front of the workers' engine servers.

Everything is a child process started from the same commands docker-compose runs
(``services.SERVICE_COMMANDS``), configured through the same ``GANTRY_*`` environment variables.
Server data and every process's log live under the project-local ``shared.paths.runtime_dir()``.
Children run in their own sessions so that the launcher alone decides the shutdown order
(the gateway, then workers, then services, then servers) and a Ctrl-C in the terminal reaches only the launcher; on
Linux they also get SIGTERM if the launcher itself dies, so nothing is ever left running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ops.auth import ADMIN, ENGINE, FLEET, GATEWAY, NATS_DIR, REDIS_DIR, AuthError, Credentials, without_userinfo
from ops.servers import (
    COLOCATED_NATS_CPUS,
    ServerProcess,
    ServerStartError,
    free_port,
    start_nats,
    start_redis,
    wait_for_port,
)
from shared.core.placement.domain import GIB
from shared.envsettings import ENGINE_NATS_URL_ENV
from shared.host.lifetime import dying_with_parent
from shared.host.report_auth import MASTER_KEY_ENV
from shared.paths import REPO_ROOT, TlsFiles, runtime_dir
from shared.settings import Settings

PLACEMENT_SERVICES: tuple[str, ...] = ("filter", "fitting", "scoring", "reconciler")
WORKERS_SERVICE = "workers"
PICKER_CHILD = "gateway"  # the endpoint picker (python -m services.gateway, identity "gateway")
ENVOY_CHILD = "envoy"
GATEWAY_CHILDREN = (ENVOY_CHILD, PICKER_CHILD)  # stopped first, in this order: no new request, then no picker
STATE_FILE = "stack.json"
LOCK_FILE = "up.lock"


class StackError(RuntimeError):
    """The stack cannot start (port taken, a binary missing, a child exiting at once)."""


@dataclass(frozen=True)
class WorkerFleet:
    """How many emulated workers to run and what GPUs each has."""

    count: int = 0
    gpus: int = 8
    gpu_type: str = "H100-SXM-80GB"
    labels: tuple[str, ...] = ()  # "key=value", given to every worker
    extra: tuple[str, ...] = ()  # more flags of the emulated-workers command (timings, name prefix)
    engines: bool = False  # an emulated engine server per RUNNING instance (what the gateway routes to)


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


def command_argv(command: Sequence[str]) -> list[str]:
    """``command`` with ``python`` bound to this interpreter."""
    argv = list(command)
    if argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv


def service_argv(name: str, commands: Mapping[str, Sequence[str]] | None = None) -> list[str]:
    """The argv of service ``name`` as docker-compose runs it, with ``python`` bound to this interpreter."""
    if commands is None:
        from services import SERVICE_COMMANDS

        commands = SERVICE_COMMANDS
    if name not in commands:
        raise StackError(f"no service named '{name}' (known: {', '.join(sorted(commands))})")  # the CLI escapes it
    return command_argv(commands[name])


def worker_argv(fleet: WorkerFleet, base: Sequence[str] | None = None) -> list[str]:
    """The emulated-workers command with the fleet's shape as flags (VRAM from the GPU catalogue)."""
    if base is None:
        from services import WORKERS_COMMAND

        base = WORKERS_COMMAND
    argv = command_argv(base)
    return [
        *argv,
        "--count", str(fleet.count),
        "--gpus", str(fleet.gpus),
        "--gpu-product", fleet.gpu_type,
        "--vram-gib", f"{gpu_vram_gib(fleet.gpu_type):g}",
        *(arg for label in fleet.labels for arg in ("--label", label)),
        *(["--engines"] if fleet.engines else []),
        *fleet.extra,
    ]


def gpu_vram_gib(gpu_type: str) -> float:
    """Memory of a GPU product in GiB, from the reference GPU catalogue."""
    from shared.catalog import UnknownGpuError, gpu_names, load_gpu_spec

    try:
        return load_gpu_spec(gpu_type).mem_bytes / GIB
    except UnknownGpuError:
        raise StackError(f"unknown GPU type '{gpu_type}' (known: {', '.join(gpu_names())})") from None  # escaped there


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


class StackLock:
    """The launcher's lock on a stack home (``flock``): one ``gantry up`` per home, taken before anything
    there is written or wiped, held for the launcher's life, released by the kernel if it dies."""

    def __init__(self, home: Path) -> None:
        self.path = home / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or StackError naming the launcher that holds it."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StackError(
                f"another `gantry up` (pid {holder}) runs a stack in {self.path.parent}; stop it with `gantry down`"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (the file stays: removing it would race another launcher taking it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True)
class GatewayPorts:
    """Where a stack's gateway listens: Envoy's OpenAI endpoint and admin, the picker (the directory of its unix
    sockets, where Envoy shares its host; a TCP port otherwise), and the endpoint file it writes for Envoy."""

    listen: int
    admin: Path | int  # Envoy's admin API: a unix socket only this user may open (mode 0600), or a TCP port
    picker: Path | int
    eds: Path

    @property
    def url(self) -> str:
        """The OpenAI endpoint clients use."""
        return f"http://127.0.0.1:{self.listen}"


def picker_argv(ports: GatewayPorts) -> list[str]:
    """The picker of a stack: its pool is placement's RUNNING instances; NATS and Redis URLs (with the
    identity's credentials) come from the environment, out of ``ps``."""
    return [sys.executable, "-m", "services.gateway", "--pool-source", "placement", "--eds-path", str(ports.eds),
            *_picker_address(ports.picker, "--grpc-port")]


def _picker_address(picker: Path | int, port_flag: str) -> list[str]:
    """The picker's unix-socket directory, or its TCP port under ``port_flag``."""
    return ["--socket-dir", str(picker)] if isinstance(picker, Path) else [port_flag, str(picker)]


def envoy_argv(ports: GatewayPorts, workdir: Path) -> list[str]:
    """Envoy with the generated config (``python -m ops.envoy`` writes it into ``workdir`` and execs Envoy)."""
    admin = ["--admin-socket" if isinstance(ports.admin, Path) else "--admin-port", str(ports.admin)]
    return [sys.executable, "-m", "ops.envoy", "--listen-port", str(ports.listen), *admin,
            *_picker_address(ports.picker, "--epp-port"), "--eds-path", str(ports.eds), "--workdir", str(workdir)]


def _run_blocking(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` to its end from synchronous code, also when this thread already runs an event loop (a bench
    that drives the stack from async code): then on a thread of its own, since a loop cannot be re-entered."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coro)
        return
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gantry-provision") as pool:
        pool.submit(asyncio.run, coro).result()


@dataclass
class LocalStack:
    """Starts and stops a whole stack; use as a context manager or call start()/stop().

    The one way to start a stack: ``gantry up``, the integration fixtures and the benchmarks all use it.
    ``external_servers`` uses NATS and Redis already running at the settings' URLs (test fixtures share
    one pair per session); otherwise the stack starts its own. Services run ``replicas`` processes each
    (named ``<service>`` for one, ``<service>-<n>`` for several).
    """

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
    replicas: int = 1
    external_servers: bool = False
    nats_monitor_port: int | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)
    wait_ready: bool = True  # start() waits until every service pulls before starting workers
    auth: bool = True  # servers of our own start with an identity per role (ops.auth); off: anyone connects
    credentials: Credentials | None = None  # the servers' identities (external servers: given by the caller)
    tls: bool = False  # NATS over TLS with the home's CA and certificate (ops.tls; generated on first use)
    gateway: bool = False  # the picker and Envoy, started before the workers (which then need engines)
    gateway_port: int = 0  # Envoy's listener (0: a free port)
    gateway_ports: GatewayPorts | None = None
    _tls_files: TlsFiles | None = None
    _lock: StackLock | None = None
    _wrote_state: bool = False

    @property
    def log_dir(self) -> Path:
        """Where every child's stdout/stderr goes."""
        return self.home / "logs"

    def preflight(self) -> None:
        """Take the home's lock, then check the ports and that Envoy is installed (with the gateway on):
        before anything in the home is written or wiped, and before any server starts."""
        if self._lock is None:
            self._lock = StackLock(self.home)
        self._lock.acquire()
        self.write_state()  # at once: `gantry down` and `gantry status` find a launcher that is still starting
        self.check_ports()
        if self.gateway:
            from ops.envoy import envoy_binary

            try:
                envoy_binary()
            except ServerStartError as err:
                raise StackError(f"{err}; or run with --no-gateway") from None

    def start(self) -> LocalStack:
        """Servers first, then services, then workers; on any failure, stop what started and raise."""
        try:
            self.preflight()
            if not self.external_servers:
                self.start_servers()
            self.start_services()
            if self.gateway:
                self.start_gateway()
            if self.fleet.count > 0:
                self.spawn(WORKERS_SERVICE, worker_argv(self.fleet, self.workers_command))
            self.write_state()
        except BaseException:
            self.stop()
            raise
        return self

    def start_services(self) -> None:
        """Provision the streams and consumers as the admin, then every service, ``replicas`` processes each;
        with ``wait_ready``, until all of them pull."""
        if self.services:
            self.provision()
        for name in self.services:
            for n in range(self.replicas):
                self.spawn(name if self.replicas == 1 else f"{name}-{n}", service_argv(name, self.commands))
        if self.services and self.wait_ready:
            # Workers register once at start: they must find the services already listening.
            asyncio.run(self.wait_services_ready())

    def start_gateway(self, timeout: float = 30.0) -> GatewayPorts:
        """The picker (pool from placement), then Envoy in front of it; returns once both listen."""
        work = self.home / "gateway"
        # the picker on unix sockets in a directory only this user enters, Envoy's admin on a socket only this
        # user may open: no other local user can reach either (the admin API stops Envoy, unauthenticated)
        ports = GatewayPorts(listen=self.gateway_port or free_port(), admin=work / "envoy" / "admin.sock",
                             picker=work / "picker",
                             eds=work / "eds" / "engines.json")
        ports.eds.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):  # the last stack's engines are gone
            ports.eds.unlink()
        self.gateway_ports = ports
        for name, argv, listener in ((PICKER_CHILD, picker_argv(ports), ports.picker),
                                     (ENVOY_CHILD, envoy_argv(ports, work / "envoy"), ports.listen)):
            child = self.spawn(name, argv)
            if isinstance(listener, Path):
                from services.gateway.protocol import GRPC_SOCKET

                listener = listener / GRPC_SOCKET
            try:
                wait_for_port(listener, child.process, timeout, child.log_path)
            except ServerStartError as err:
                raise StackError(f"{name} did not start: {err}") from None
        return ports

    def check_ports(self) -> None:
        """StackError if NATS's, Redis's or the gateway's port is taken (another stack, most likely)."""
        wanted = []
        if not self.external_servers:
            wanted += [
                ("NATS", url_port(self.settings.nats_url, 4222), "GANTRY_NATS_URL"),
                ("Redis", url_port(self.settings.redis_url, 6379), "GANTRY_REDIS_URL"),
            ]
        if self.gateway and self.gateway_port:
            wanted.append(("The gateway", self.gateway_port, "--gateway-port"))
        seen: dict[int, str] = {}
        for what, port, env in wanted:  # (on one host: a port named twice would start one server, the other fail)
            if port in seen:
                raise StackError(f"{what} and {seen[port]} are both given port {port}: choose another with {env}")
            seen[port] = what
        for what, port, env in wanted:
            if port_in_use(port):
                raise StackError(
                    f"{what} port {port} is already in use (another `gantry up`?); "
                    f"stop it with `gantry down` or choose another port with {env}"
                )

    def start_servers(self) -> None:
        """Start NATS (JetStream) and Redis on the ports the settings name (with the home's credentials,
        generated on first use, unless ``auth`` is off)."""
        self.check_ports()
        if self.auth and self.credentials is None:
            try:
                self.credentials = Credentials.ensure(self.home)
            except AuthError as err:  # an empty or corrupt file (a crash while it was written): one line, not a trace
                raise StackError(f"{err}: remove it, and `gantry up` makes new credentials") from None
        if self.tls and self._tls_files is None:
            from ops.tls import ensure_tls

            try:
                self._tls_files = ensure_tls(self.home)
            except AuthError as err:
                raise StackError(str(err)) from None
            # Every client trusts the home's CA (the children through GANTRY_TLS_CA_FILE).
            self.settings = self.settings.model_copy(update={"tls_ca_file": str(self._tls_files.ca)})
        try:
            self.nats = self._start_nats()
            self.redis = self._start_redis()
        except ServerStartError as err:
            raise StackError(str(err)) from None

    def provision(self) -> None:
        """Declare every stream and durable consumer as the admin: services may only read them."""
        from ops.provision import provision

        try:
            _run_blocking(provision(self.settings_for(ADMIN)))
        except Exception as err:
            raise StackError(f"could not provision the streams: {err}") from None

    def _start_nats(self) -> ServerProcess:
        return start_nats(
            self.home / NATS_DIR, port=url_port(self.settings.nats_url, 4222), cpus=COLOCATED_NATS_CPUS,
            monitor_port=self.nats_monitor_port, auth=self.credentials, tls=self._tls_files, dies_with_parent=True,
        )

    def _start_redis(self) -> ServerProcess:
        return start_redis(
            self.home / REDIS_DIR, port=url_port(self.settings.redis_url, 6379),
            password=None if self.credentials else url_password(self.settings.redis_url), auth=self.credentials,
            dies_with_parent=True,
        )

    def kill_server(self, which: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to NATS or Redis ("nats" | "redis") and wait for it to exit (chaos tests)."""
        server = self.nats if which == "nats" else self.redis
        if server is not None and server.alive():
            server.process.send_signal(sig)
            server.process.wait(10)

    def restart_server(self, which: str) -> None:
        """Start NATS or Redis again on its port and data (after ``kill_server``); a restarted NATS is
        provisioned again, as at start, before this returns."""
        if which == "nats":
            self.nats = self._start_nats()
            if self.services:
                # With memory storage a restart loses every stream and consumer, and services only wait for
                # them (they may not declare them): the admin declares them again (a no-op for file storage).
                self.provision()
        else:
            self.redis = self._start_redis()
        self.write_state()

    def child(self, name: str) -> Child:
        """The running (or last) child called ``name``."""
        for child in reversed(self.children):
            if child.name == name:
                return child
        raise KeyError(name)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to child ``name``; for SIGKILL/SIGTERM, wait for it to exit."""
        proc = self.child(name).process
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            proc.wait(10)

    def restart(self, name: str) -> Child:
        """Start child ``name`` again with the same command (after it exited or was killed)."""
        old = self.child(name)
        if old.alive():
            raise StackError(f"{name} is still running")
        self.children.remove(old)
        child = self.spawn(name, old.argv)
        self.write_state()
        return child

    async def wait_services_ready(self, timeout: float = 60.0) -> None:
        """Until every durable consumer of the services is pulling (or a child dies: StackError)."""
        import nats
        from nats.js.errors import NotFoundError

        from shared.bus import streams
        from shared.bus.runtime import nats_options

        wanted = [(stream, durable) for stream, durable, _ in streams.ALL_CONSUMERS]
        admin = self.settings_for(ADMIN)
        nc = await nats.connect(admin.nats_url, connect_timeout=5, **nats_options(admin))
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

    def settings_for(self, identity: str | None) -> Settings:
        """The stack's settings as ``identity`` (its user and secret in both URLs); unchanged without
        credentials or identity."""
        if self.credentials is None or identity is None:
            return self.settings
        return self.settings.model_copy(update={
            "nats_url": self.credentials.url(self.settings.nats_url, identity),
            "redis_url": self.credentials.url(self.settings.redis_url, identity),
            "identity": identity,
        })

    def child_env(self, identity: str | None = None) -> dict[str, str]:
        """The environment every child gets: this one plus the stack's GANTRY_* settings (as ``identity``)."""
        env = dict(os.environ)
        for name, value in self.settings_for(identity).model_dump().items():
            env[f"GANTRY_{name.upper()}"] = str(value)
        env.update(self.extra_env)
        if identity is not None and self.credentials is not None:  # a child always runs as its own identity
            own = self.settings_for(identity)
            env.update(GANTRY_NATS_URL=own.nats_url, GANTRY_REDIS_URL=own.redis_url, GANTRY_IDENTITY=identity)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def env_for(self, argv: Sequence[str]) -> dict[str, str]:
        """The environment of the child ``argv`` runs: as its own identity; a fleet that runs engine servers
        (``--engines``) also gets the engine identity's NATS URL to hand them. The fleet gives each server an
        environment of its own with that URL, the server's own report key and none of this one's settings or
        credentials (``services.workers.engines.server_env``). That fleet and the gateway get the engines' report
        master key (the fleet derives each server's key from it, the gateway checks every report with it); no
        other child does."""
        identity = identity_of(argv)
        env = self.child_env(identity)
        env.pop(MASTER_KEY_ENV, None)  # never inherited from the launcher's own environment
        engines = identity == FLEET and "--engines" in argv
        if engines and self.credentials is not None:
            env[ENGINE_NATS_URL_ENV] = self.credentials.url(self.settings.nats_url, ENGINE)
        if (engines or identity == GATEWAY) and self.credentials is not None and self.credentials.report_key:
            env[MASTER_KEY_ENV] = self.credentials.report_key
        return env

    def spawn(self, name: str, argv: list[str]) -> Child:
        """Start one child with its output in ``logs/<name>.log``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        env = self.env_for(argv)
        # the placement services ("scoring" or "scoring-1") and the picker (its refused engine reports)
        if name in self.services or name.rsplit("-", 1)[0] in self.services or name == PICKER_CHILD:
            env["GANTRY_METRICS_PORT"] = str(self.metrics_ports.setdefault(name, free_port()))
            env["GANTRY_METRICS_HOST"] = "127.0.0.1"  # a laptop's stack: not every interface (a container publishes)
        with log.open("ab") as out:
            out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                # The parent-death signal is set by an exec wrapper, not a preexec_fn: a preexec_fn makes this a
                # real fork() that runs every fork handler loaded here in the child (gRPC's aborted children this
                # way in the test process, where a picker had run); without one subprocess uses vfork.
                dying_with_parent(argv, env),
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
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
        """Stop the gateway (Envoy, then the picker), workers, then services (SIGTERM, then SIGKILL after
        ``timeout``), then the servers."""
        gateway = [c for name in GATEWAY_CHILDREN for c in self.children if c.name == name]
        workers = [c for c in self.children if c.name == WORKERS_SERVICE]
        services = [c for c in self.children if c not in gateway and c not in workers]
        for group in ([c for c in gateway if c.name == ENVOY_CHILD], [c for c in gateway if c.name == PICKER_CHILD],
                      workers, services):
            _terminate(group, timeout)
        if not self.external_servers:
            for server in (self.redis, self.nats):
                if server is not None:
                    server.stop()
        self.children.clear()
        if self._wrote_state:  # only the stack that wrote the state file removes it: never a running one's
            with contextlib.suppress(OSError):
                (self.home / STATE_FILE).unlink()
            self._wrote_state = False
        if self._lock is not None:
            self._lock.release()

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
            "nats_url": without_userinfo(self.settings.nats_url),
            "children": {c.name: c.process.pid for c in self.children},
            "servers": {s.name: s.process.pid for s in (self.nats, self.redis) if s is not None},
            "metrics": {name: f"http://127.0.0.1:{port}/metrics" for name, port in self.metrics_ports.items()},
        }
        if self.gateway_ports is not None:
            g = self.gateway_ports
            admin = f"unix:{g.admin}" if isinstance(g.admin, Path) else f"http://127.0.0.1:{g.admin}"
            state["gateway"] = {"url": g.url, "envoy_admin": admin,
                                "picker": str(g.picker), "eds": str(g.eds)}
        tmp = self.home / f".{STATE_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.home / STATE_FILE)  # readers never see half a file
        self._wrote_state = True

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def identity_of(argv: Sequence[str]) -> str | None:
    """The identity a child runs as, from the service module it runs (``-m services.<name>``); None for any
    other command (it gets the stack's own settings)."""
    argv = list(argv)
    if "-m" not in argv or argv.index("-m") + 1 >= len(argv):
        return None
    module = argv[argv.index("-m") + 1]
    if not module.startswith("services."):
        return None
    name = module.split(".")[1]
    return {"workers": FLEET, "engine_server": ENGINE}.get(name, name)


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


def pid_alive(pid: int) -> bool:
    """True while process ``pid`` runs (a zombie has exited: it only waits for its parent to reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def running_launcher(home: Path | None = None) -> int | None:
    """The pid of the live ``gantry up`` of this home, or None: the one its state file records, or while it starts
    (before that file is written) the one its lock file names. Either only if that process holds the home's lock
    file open while the lock is held: a file a killed launcher left names a pid the system may have given another
    process since (``gantry down`` then stopped that one)."""
    home = home or runtime_dir()
    if not lock_held(home):
        return None
    state = read_state(home)
    recorded = state.get("pid") if state else None
    for pid in (recorded, _lock_file_pid(home)):
        if isinstance(pid, int) and pid > 0 and pid_alive(pid) and _has_open(pid, home / LOCK_FILE):
            return pid
    return None


def _lock_file_pid(home: Path) -> int | None:
    try:
        text = (home / LOCK_FILE).read_text()[:32].strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _has_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open (its descriptors in /proc; False when they cannot be read)."""
    target = os.path.realpath(path)
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
    return False


def lock_held(home: Path) -> bool:
    """Whether a live launcher holds the home's lock (the kernel lets go of a dead one's)."""
    try:
        fd = os.open(home / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True  # held (exclusively) by the launcher
    finally:
        os.close(fd)
    return False


def signal_running_stack(home: Path | None = None, sig: int = signal.SIGTERM) -> int | None:
    """Send ``sig`` to the launcher recorded in the state file; its pid, or None if none runs."""
    pid = running_launcher(home)
    if pid is None:
        return None
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return None
    return pid


def stop_running_stack(home: Path | None = None, timeout: float = 60.0) -> tuple[int, bool] | None:
    """SIGTERM the running launcher (a foreground or a background ``gantry up``: a background job ignores
    SIGINT) and wait for it to exit; (pid, stopped in time), or None if no stack runs."""
    pid = signal_running_stack(home, signal.SIGTERM)
    if pid is None:
        return None
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return pid, False
        time.sleep(0.1)
    return pid, True
