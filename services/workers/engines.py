"""The emulated engine servers a fleet runs for its instances (``python -m services.workers --engines``).

One ``python -m services.engine_server`` process per instance, on a free loopback port, publishing on NATS
as the engine identity. A server's environment is built afresh (:func:`server_env`): the engine's NATS URL
(never on its command line, which every local user can read) and what Python and the catalogue need, nothing
of the fleet's own identity or settings. The fleet talks to its servers over loopback HTTP only: /health and
/server_info (its instance id) to know a server is up and is the instance's, /metrics (vLLM's names) to know a
draining one has nothing in flight. Each server is its own session and gets SIGTERM if the fleet dies
(Linux ``PR_SET_PDEATHSIG``, set by ``shared.host.lifetime``'s exec wrapper), so a killed fleet leaves nothing
running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from services.workers.engine_policy import EngineLoad, parse_load
from shared.envsettings import ENGINE_NATS_URL_ENV
from shared.host.lifetime import dying_with_parent
from shared.host.report_auth import REPORT_KEY_ENV, derive_key

log = logging.getLogger("gantry.workers.engines")

# What a server needs of the fleet's environment: Python's and the locale's own, and where the catalogue (data),
# the runtime folder and the CA of a TLS stack are. Nothing else: the fleet's GANTRY_NATS_URL, GANTRY_REDIS_URL,
# GANTRY_IDENTITY and GANTRY_CREDENTIALS_FILE name the workers' identity and its secret.
_PASSED_ON = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH",
              "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "GANTRY_DATA_DIR", "GANTRY_HOME", "GANTRY_TLS_CA_FILE")


def server_env(fleet_env: Mapping[str, str], nats_url: str | None, report_key: bytes | None = None) -> dict[str, str]:
    """The environment of an engine server: what it needs of ``fleet_env``, the engine identity's NATS URL and
    its own report key (derived for its instance: never the fleet's master key, so a compromised server can sign
    only as itself)."""
    env = {name: fleet_env[name] for name in _PASSED_ON if name in fleet_env}
    if nats_url:
        env[ENGINE_NATS_URL_ENV] = nats_url
    if report_key is not None:
        env[REPORT_KEY_ENV] = report_key.hex()
    return env


def free_port() -> int:
    """A loopback TCP port nobody listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def http_get(port: int, path: str, timeout_s: float) -> tuple[int, bytes]:
    """GET ``path`` on a loopback port: (status, body). Raises OSError/TimeoutError when nothing answers."""
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise OSError(f"not an HTTP answer from port {port}") from None
    return status, body


@dataclass(frozen=True)
class EngineOptions:
    """How the fleet runs its servers."""

    nats_url: str | None = None  # the engine identity's URL (None: the servers do not publish)
    start_timeout_s: float = 30.0  # longest a server may take to answer /health
    stop_grace_s: float = 5.0  # SIGTERM, then SIGKILL after this
    poll_interval_s: float = 0.2  # /health while starting, /metrics while draining
    extra_args: tuple[str, ...] = ()  # more server flags (e.g. --speedup)
    report_master: bytes | None = None  # the engines' report master key (None: the servers publish unsigned)


@dataclass
class EngineServer:
    """One running server process."""

    instance_id: str
    port: int
    process: asyncio.subprocess.Process
    stopping: bool = False
    started_at: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        """Its base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def exited(self) -> bool:
        """True once the process has exited (and been reaped)."""
        return self.process.returncode is not None


class EngineSupervisor:
    """Starts, watches and stops the servers of a fleet's instances."""

    def __init__(self, opts: EngineOptions, on_exit: Callable[[str, int], Awaitable[None]]) -> None:
        self.opts = opts
        self.servers: dict[str, EngineServer] = {}
        self._on_exit = on_exit  # (instance id, exit code) of a server that stopped without being asked to
        self._watchers: set[asyncio.Task[None]] = set()

    def argv(self, instance_id: str, served_model_name: str, port: int, spec: list[str]) -> list[str]:
        """The server's command line (no secret: the NATS URL goes in its environment)."""
        return [sys.executable, "-m", "services.engine_server", "--host", "127.0.0.1", "--port", str(port),
                "--instance-id", instance_id, "--served-model-name", served_model_name,
                "--disable-uvicorn-access-log", *spec, *self.opts.extra_args]

    def report_key(self, instance_id: str) -> bytes | None:
        """The key ``instance_id``'s server signs its reports with (None without a master key)."""
        master = self.opts.report_master
        return derive_key(master, instance_id) if master is not None else None

    async def start(self, instance_id: str, served_model_name: str, spec: list[str]) -> EngineServer:
        """Start the instance's server and wait until it answers /health; on failure the process is stopped
        and RuntimeError says why."""
        port = free_port()
        env = server_env(os.environ, self.opts.nats_url, self.report_key(instance_id))
        # The parent-death signal is set by the exec wrapper, not a preexec_fn: a preexec_fn makes this a real
        # fork() of a threaded process (unsafe; it runs every fork handler loaded here in the child), without
        # one subprocess spawns with vfork. The server keeps the wrapper's pid.
        proc = await asyncio.create_subprocess_exec(
            *dying_with_parent(self.argv(instance_id, served_model_name, port, spec), env),
            stdin=asyncio.subprocess.DEVNULL, env=env, start_new_session=True,
        )
        server = EngineServer(instance_id, port, proc)
        self.servers[instance_id] = server
        try:
            await self._wait_healthy(server)
        except BaseException:
            await self.stop(instance_id)
            raise
        watcher = asyncio.ensure_future(self._watch(server))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return server

    async def _wait_healthy(self, server: EngineServer) -> None:
        deadline = time.monotonic() + self.opts.start_timeout_s
        while True:
            if server.exited:
                raise RuntimeError(f"engine server exited with code {server.process.returncode} at start-up")
            with contextlib.suppress(OSError, TimeoutError):
                status, _ = await http_get(server.port, "/health", 2.0)
                if status == 200 and await self._serves(server):
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"engine server did not answer /health within {self.opts.start_timeout_s:g} s")
            await asyncio.sleep(min(0.05, self.opts.poll_interval_s))

    @staticmethod
    async def _serves(server: EngineServer) -> bool:
        """True when the server on the port is this instance's: the port was free when chosen, but another
        instance's server may have taken it since (then this one cannot bind and exits)."""
        status, body = await http_get(server.port, "/server_info", 2.0)
        if status != 200:
            return False
        try:
            found = json.loads(body).get("instance_id")
        except (ValueError, AttributeError):
            return False
        return bool(found == server.instance_id)

    async def _watch(self, server: EngineServer) -> None:
        code = await server.process.wait()
        if self.servers.get(server.instance_id) is server and not server.stopping:
            del self.servers[server.instance_id]
            await self._on_exit(server.instance_id, code)

    async def load(self, instance_id: str) -> EngineLoad | None:
        """The server's running and waiting counts from its /metrics; None when it does not answer."""
        server = self.servers.get(instance_id)
        if server is None or server.exited:
            return None
        try:
            status, body = await http_get(server.port, "/metrics", 2.0)
        except (OSError, TimeoutError):
            return None
        return parse_load(body.decode(errors="replace")) if status == 200 else None

    def running(self, instance_id: str) -> bool:
        """True while the instance's server runs."""
        server = self.servers.get(instance_id)
        return server is not None and not server.exited

    async def stop(self, instance_id: str) -> None:
        """Stop the instance's server (SIGTERM, SIGKILL after the grace) and reap it; nothing if none runs."""
        server = self.servers.pop(instance_id, None)
        if server is None:
            return
        server.stopping = True
        proc = server.process
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.opts.stop_grace_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    async def stop_all(self) -> None:
        """Stop every server (the fleet is exiting)."""
        await asyncio.gather(*(self.stop(i) for i in list(self.servers)), return_exceptions=True)
        for watcher in list(self._watchers):
            watcher.cancel()
