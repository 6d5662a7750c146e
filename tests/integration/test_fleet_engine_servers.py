"""The engine servers of a fleet started with ``--engines``: what each one is given (no secret on its command
line or in its logs, none of the fleet's own identity in its environment), that a server is taken for its
instance's only when it says so, that a drain while an instance starts is never undone by the start, and that a
server dies with its fleet."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats
import pytest

from services.workers import engines
from services.workers.emulator import Fleet, FleetConfig
from services.workers.engines import EngineOptions, EngineSupervisor
from shared.bus import subjects
from shared.bus.messages import AssignInstance, AssignInstances, DrainInstance, InstanceReports, decode, encode
from shared.bus.streams import ensure_streams
from shared.core.placement.domain import InstanceState
from shared.settings import Settings
from tests.conftest import ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ENGINE_URL = "nats://engine_server:E-s3cret@127.0.0.1:9"  # nothing listens: the server only tries to publish
FLEET_SECRET = "W-s3cret"


async def _no_exit(instance_id: str, code: int) -> None:
    raise AssertionError(f"server of {instance_id} exited with {code}")


def proc_text(pid: int, name: str) -> str:
    return (Path(f"/proc/{pid}") / name).read_bytes().replace(b"\0", b"\n").decode()


async def test_a_server_gets_the_engine_url_in_its_environment_and_nothing_of_the_fleets_identity(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GANTRY_NATS_URL", f"nats://workers:{FLEET_SECRET}@127.0.0.1:4222")
    monkeypatch.setenv("GANTRY_REDIS_URL", f"redis://workers:{FLEET_SECRET}@127.0.0.1:6379/0")
    monkeypatch.setenv("GANTRY_IDENTITY", "workers")
    monkeypatch.setenv("GANTRY_CREDENTIALS_FILE", "/run/secrets/credentials.json")
    sup = EngineSupervisor(EngineOptions(nats_url=ENGINE_URL), _no_exit)
    try:
        server = await sup.start("inst-env", "m", [])
        pid = server.process.pid
        cmdline, environ = proc_text(pid, "cmdline"), proc_text(pid, "environ")
        logged = ""
        deadline = time.monotonic() + 10
        while "publishing on NATS" not in logged and time.monotonic() < deadline:  # its first attempt to connect
            await asyncio.sleep(0.05)
            logged += "".join(capfd.readouterr())
    finally:
        await sup.stop_all()
    assert "s3cret" not in cmdline, "a command line is readable by every local user"
    assert f"GANTRY_ENGINE_NATS_URL={ENGINE_URL}" in environ.splitlines()
    assert FLEET_SECRET not in environ
    assert not {"GANTRY_NATS_URL", "GANTRY_REDIS_URL", "GANTRY_IDENTITY", "GANTRY_CREDENTIALS_FILE"} & {
        line.split("=", 1)[0] for line in environ.splitlines()}
    logged += "".join(capfd.readouterr())
    assert "publishing on NATS nats://127.0.0.1:9" in logged
    assert "s3cret" not in logged


async def test_a_server_of_another_instance_on_the_chosen_port_is_not_taken_for_this_instances(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    sup = EngineSupervisor(EngineOptions(start_timeout_s=15), _no_exit)
    try:
        other = await sup.start("inst-a", "m", [])
        # the race free_port() leaves open: the port was free when chosen and another server has it now
        monkeypatch.setattr(engines, "free_port", lambda: other.port)
        with pytest.raises(RuntimeError, match="exited"):
            await sup.start("inst-b", "m", [])
        assert not sup.running("inst-b") and sup.running("inst-a")
    finally:
        await sup.stop_all()


async def test_an_instance_drained_while_its_server_starts_stays_draining_and_is_idle(
    nats_server: ServerProcess
) -> None:
    nc = await nats.connect(nats_server.url)
    await ensure_streams(nc.jetstream(), Settings())
    reports: list[tuple[InstanceState, bool]] = []

    async def on_status(msg: Any) -> None:
        reports.extend((r.state, r.idle) for r in decode(msg.data, InstanceReports).reports)

    await nc.subscribe(subjects.instance_status("drainstart0"), cb=on_status)
    fleet = Fleet(FleetConfig(count=1, prefix="drainstart", gpus=1, start_delay_s=0, download_delay_s=0,
                              engines=True, drain_settle_s=0.1), nc)
    try:
        await fleet.start()
        assign = AssignInstance(instance_id="inst-d", model="llama-3.1-8b", source="meta-llama/Llama-3.1-8B-Instruct",
                                gpu_indexes=(0,), vram_claims=(1,))
        await nc.publish(subjects.worker_assign("drainstart0"), encode(AssignInstances(instances=(assign,))))
        assert fleet.engines is not None
        deadline = time.monotonic() + 10
        while not fleet.engines.servers and time.monotonic() < deadline:  # its server is starting
            await asyncio.sleep(0.01)
        assert fleet.engines.servers and (InstanceState.RUNNING, False) not in reports
        await nc.publish(subjects.worker_drain("drainstart0"), encode(DrainInstance(instance_id="inst-d")))
        while fleet.engines.servers and time.monotonic() < deadline + 10:  # its start stops short
            await asyncio.sleep(0.05)
        while len(reports) < 2 and time.monotonic() < deadline + 10:  # the reports get through
            await asyncio.sleep(0.05)
        inst = fleet.workers["drainstart0"].instances["inst-d"]
        assert inst.state is InstanceState.DRAINING
        assert reports == [(InstanceState.STARTING, False), (InstanceState.DRAINING, True)]
        assert not fleet.engines.servers
    finally:
        await fleet.close()
        await nc.close()


async def test_a_closing_fleet_cancels_starts_under_way_and_takes_no_new_assignment(
    nats_server: ServerProcess
) -> None:
    nc = await nats.connect(nats_server.url)
    await ensure_streams(nc.jetstream(), Settings())
    fleet = Fleet(FleetConfig(count=1, prefix="closing", gpus=2, start_delay_s=0, download_delay_s=0,
                              engines=True), nc)
    try:
        await fleet.start()
        assert fleet.engines is not None

        def assign(iid: str, gpu: int) -> bytes:
            one = AssignInstance(instance_id=iid, model="llama-3.1-8b", source="meta-llama/Llama-3.1-8B-Instruct",
                                 gpu_indexes=(gpu,), vram_claims=(1,))
            return encode(AssignInstances(instances=(one,)))

        await nc.publish(subjects.worker_assign("closing0"), assign("inst-a", 0))
        deadline = time.monotonic() + 10
        while not fleet.engines.servers and time.monotonic() < deadline:  # its server is starting
            await asyncio.sleep(0.01)
        started = [s.process.pid for s in fleet.engines.servers.values()]
        assert started
        await fleet.close()
        await nc.publish(subjects.worker_assign("closing0"), assign("inst-b", 1))  # while the fleet shuts down
        await nc.flush()
        await asyncio.sleep(0.5)
        assert not fleet.engines.servers
        assert all(not Path(f"/proc/{pid}").exists() for pid in started)
    finally:
        await fleet.close()
        await nc.close()


FLEET = """
import asyncio, os
from services.workers.engines import EngineOptions, EngineSupervisor
os.register_at_fork(before=lambda: print("fork handler ran", flush=True))


async def main() -> None:
    async def on_exit(instance_id: str, code: int) -> None:
        pass

    server = await EngineSupervisor(EngineOptions(), on_exit).start("inst-orphan", "m", [])
    print(server.process.pid, flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_server_is_spawned_without_running_fork_handlers_and_dies_with_a_killed_fleet() -> None:
    fleet = subprocess.Popen([sys.executable, "-c", FLEET], stdout=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert fleet.stdout is not None
        first = fleet.stdout.readline()  # once the server answers /health (the fleet's start waits for that)
        assert first.strip().isdigit(), first  # "fork handler ran" first: the server was forked, handlers and all
        server = int(first)
        assert b"services.engine_server" in Path(f"/proc/{server}/cmdline").read_bytes()
    finally:
        fleet.kill()
        fleet.wait(10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive(server):
        time.sleep(0.05)
    assert not _alive(server), "the server outlived its fleet"


def _alive(pid: int) -> bool:
    """Running, neither gone nor a zombie waiting for its new parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
