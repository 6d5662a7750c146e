"""The placement stack as real processes against the session's real nats-server and redis-server.

Each test gets a fresh Redis database and fresh JetStream streams, then starts the services exactly as
``SERVICE_COMMANDS`` says (optionally several replicas each) and emulated workers, with short timings.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client

from ops.servers import ServerProcess, free_port
from services import SERVICE_COMMANDS, WORKERS_COMMAND
from shared.bus import streams, subjects
from shared.bus.messages import ErrorEvent, ScaleCommand, encode
from shared.bus.streams import delete_streams
from shared.core.placement.domain import Instance, InstanceState, ModelSpec
from shared.state import StateStore

REPO = Path(__file__).resolve().parents[3]

TIMINGS = {
    "GANTRY_HEARTBEAT_INTERVAL_S": "0.2",
    "GANTRY_NOT_READY_AFTER_S": "1.5",
    "GANTRY_RESCHEDULE_AFTER_S": "2",
    "GANTRY_DRAIN_TIMEOUT_S": "2",
    "GANTRY_ACK_WAIT_S": "2",
    "GANTRY_MAX_DELIVER": "6",
    "GANTRY_RECONCILE_INTERVAL_S": "0.25",
    "GANTRY_JS_STORAGE": "memory",
}

# Redis has 16 databases; 0 is left to other tests. Each test flushes the one it gets, so reuse is safe.
_db_counter = itertools.cycle(range(1, 16))


def _argv(cmd: list[str]) -> list[str]:
    return [sys.executable if cmd[0] == "python" else cmd[0], *cmd[1:]]


@dataclass
class Stack:
    """A running placement stack and helpers to drive and inspect it."""

    env: dict[str, str]
    logs: Path
    nc: Client
    store: StateStore
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    dead_letters: list[ErrorEvent] = field(default_factory=list)
    metrics_ports: dict[str, int] = field(default_factory=dict)  # process name -> its /metrics port
    _seq: int = 0

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a process (logs under the test's tmp dir)."""
        with (self.logs / f"{name}.log").open("ab") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(argv, cwd=REPO, env=env or self.env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def start_service(self, service: str, replica: int = 0) -> None:
        """Start one replica of a placement service, its metrics on a free port of its own."""
        name = f"{service}-{replica}"
        port = self.metrics_ports.setdefault(name, free_port())
        self.start(name, _argv(SERVICE_COMMANDS[service]), {**self.env, "GANTRY_METRICS_PORT": str(port)})

    def start_services(self, replicas: int = 1) -> None:
        """Start every placement service with ``replicas`` replicas each."""
        for service in SERVICE_COMMANDS:
            for r in range(replicas):
                self.start_service(service, r)

    def start_workers(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Start an emulated worker fleet process."""
        return self.start(name, [*_argv(WORKERS_COMMAND), *args])

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send a signal to one of the stack's processes."""
        self.procs[name].send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            self.procs[name].wait(10)

    def stop_all(self) -> None:
        """Stop every process the stack started."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
        for proc in self.procs.values():
            proc.wait(10)

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
    env = {**os.environ, **TIMINGS, "GANTRY_NATS_URL": nats_server.url, "GANTRY_REDIS_URL": redis_url}
    env["PYTHONPATH"] = str(REPO)
    st = Stack(env=env, logs=tmp_path, nc=nc, store=store)

    async def on_dead_letter(msg: Any) -> None:
        st.dead_letters.append(msgspec.json.decode(msg.data, type=ErrorEvent))

    await nc.subscribe(subjects.DEAD_LETTER_ALL, cb=on_dead_letter)
    try:
        yield st
    finally:
        st.stop_all()
        await nc.close()
        await store.close()
        for log in sorted(tmp_path.glob("*.log")):
            text = log.read_text(errors="replace")
            if "Traceback" in text or "ERROR" in text:
                print(f"==== {log.name}\n{text[-6000:]}")
