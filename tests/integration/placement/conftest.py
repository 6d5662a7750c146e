"""The placement stack as real processes against the session's real nats-server and redis-server.

Each test gets a fresh Redis database and fresh JetStream streams, then starts the services exactly as
``SERVICE_COMMANDS`` says (optionally several replicas each) and emulated workers, with short timings,
through ``ops.stack.LocalStack``: the same launcher as ``gantry up`` and the benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client

from ops.servers import ServerProcess
from ops.stack import PLACEMENT_SERVICES, LocalStack, command_argv, service_argv
from services import WORKERS_COMMAND
from shared.bus import streams, subjects
from shared.bus.messages import ErrorEvent, ScaleCommand, encode
from shared.bus.runtime import prepare
from shared.bus.streams import delete_streams
from shared.core.placement.domain import Instance, InstanceState, ModelSpec
from shared.settings import Settings
from shared.state import StateStore

TIMINGS: dict[str, Any] = {
    "heartbeat_interval_s": 0.2,
    "not_ready_after_s": 1.5,
    "reschedule_after_s": 2,
    "drain_timeout_s": 2,
    "ack_wait_s": 2,
    "max_deliver": 6,
    "reconcile_interval_s": 0.25,
    "js_storage": "memory",
}

# Redis has 16 databases; 0 is left to other tests. Each test flushes the one it gets, so reuse is safe.
_db_counter = itertools.cycle(range(1, 16))


@dataclass
class Stack:
    """A running placement stack and helpers to drive and inspect it.

    Its processes are started by ``ops.stack.LocalStack`` (the one way to start a stack) on the session's
    servers; each child is named as the test refers to it (``filter-0``, ``fleet``, ...).
    """

    launcher: LocalStack
    env: dict[str, str]  # every child's environment; a test may change it before starting processes
    logs: Path
    nc: Client
    store: StateStore
    dead_letters: list[ErrorEvent] = field(default_factory=list)
    _seq: int = 0

    @property
    def metrics_ports(self) -> dict[str, int]:
        """Each service process's /metrics port, by process name (``filter-0``, ...)."""
        return self.launcher.metrics_ports

    @property
    def procs(self) -> dict[str, subprocess.Popen[bytes]]:
        """Every process started, by name (the latest of a name)."""
        return {c.name: c.process for c in self.launcher.children}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start a process (logs under the test's tmp dir)."""
        return self.launcher.spawn(name, argv).process

    def start_service(self, service: str, replica: int = 0) -> None:
        """Start one replica of a placement service."""
        name = f"{service}-{replica}"
        with contextlib.suppress(KeyError):  # a restart: the stack forgets the dead one
            old = self.launcher.child(name)
            if not old.alive():
                self.launcher.children.remove(old)
        self.start(name, service_argv(service))

    def start_services(self, replicas: int = 1) -> None:
        """Start every placement service with ``replicas`` replicas each."""
        for service in PLACEMENT_SERVICES:
            for r in range(replicas):
                self.start_service(service, r)

    def start_workers(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Start an emulated worker fleet process."""
        return self.start(name, [*command_argv(WORKERS_COMMAND), *args])

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send a signal to one of the stack's processes."""
        self.launcher.kill(name, sig)

    def stop_all(self) -> None:
        """Stop every process the stack started."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
        for proc in self.procs.values():
            proc.wait(10)
        self.launcher.stop()

    def crashed(self) -> list[str]:
        """Services that exited on their own (a bug)."""
        return [n for n, p in self.procs.items() if p.poll() not in (None, -signal.SIGKILL, -signal.SIGTERM)]

    async def wait_ready(self, workers: int, timeout: float = 30.0) -> None:
        """Wait until every service's consumers exist and ``workers`` workers are registered in Redis."""
        js = self.nc.jetstream()

        async def consumers_exist() -> bool:
            try:
                for stream, durable in CONSUMERS:
                    await js.consumer_info(stream, durable)
            except Exception:
                return False
            return True

        await wait_until(consumers_exist, timeout, "service consumers")
        await wait_until(
            lambda: _count_at_least(self.store.worker_names(), workers), timeout, f"{workers} registered workers"
        )

    async def scale(self, spec: ModelSpec, replicas: int, with_spec: bool = True) -> None:
        """Publish a scale command on JetStream (deduped by a unique id)."""
        self._seq += 1
        cmd = ScaleCommand(model=spec.name, replicas=replicas, spec=spec if with_spec else None)
        await self.nc.jetstream().publish(
            subjects.SCALE, encode(cmd), headers={"Nats-Msg-Id": f"test-{spec.name}-{self._seq}-{time.time()}"}
        )

    async def instances(self, model: str | None = None) -> list[Instance]:
        """Current instances (from Redis)."""
        return await self.store.instances(model)

    async def states(self, model: str) -> dict[InstanceState, int]:
        """Count of a model's instances per state."""
        out: dict[InstanceState, int] = {}
        for inst in await self.instances(model):
            out[inst.state] = out.get(inst.state, 0) + 1
        return out


async def _count_at_least(names: Awaitable[set[str]], n: int) -> bool:
    return len(await names) >= n


CONSUMERS = [(stream, durable) for stream, durable, _ in streams.ALL_CONSUMERS]


async def wait_until(
    check: Callable[[], Awaitable[Any]], timeout: float, what: str, interval: float = 0.1
) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@pytest.fixture
async def stack(
    nats_server: ServerProcess, redis_server: ServerProcess, tmp_path: Path
) -> AsyncIterator[Stack]:
    """A fresh placement stack (services are started by the test)."""
    db = next(_db_counter)
    redis_url = redis_server.url.rsplit("/", 1)[0] + f"/{db}"
    store = StateStore.from_url(redis_url)
    await store.r.flushdb()
    nc = await nats.connect(nats_server.url)
    await delete_streams(nc.jetstream())
    settings = Settings(nats_url=nats_server.url, redis_url=redis_url, **TIMINGS)
    await prepare(nc, settings, streams.ALL_CONSUMERS)  # the launcher's step, as the admin: services only read
    launcher = LocalStack(settings, home=tmp_path, external_servers=True, credentials=nats_server.credentials)
    env = launcher.child_env()
    launcher.extra_env = env  # the same dict: what a test changes in ``stack.env`` reaches the next child
    st = Stack(launcher=launcher, env=env, logs=launcher.log_dir, nc=nc, store=store)

    async def on_dead_letter(msg: Any) -> None:
        st.dead_letters.append(msgspec.json.decode(msg.data, type=ErrorEvent))

    await nc.subscribe(subjects.DEAD_LETTER_ALL, cb=on_dead_letter)
    try:
        yield st
    finally:
        st.stop_all()
        await nc.close()
        await store.close()
        for log in sorted(st.logs.glob("*.log")):
            text = log.read_text(errors="replace")
            if "Traceback" in text or "ERROR" in text:
                print(f"==== {log.name}\n{text[-6000:]}")
