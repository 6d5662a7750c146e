"""The placement services' snapshot repairs itself beside its feed, not in it: a heartbeat from a worker it does not
hold is read from the store without holding up other heartbeats, a reordered removal is undone by that read, and a
removed worker's model files leave with it. The services in process (not started); NATS real where it carries the
heartbeats."""

from __future__ import annotations

import asyncio

import nats

from ops.servers import ServerProcess
from services.filter.service import FilterService
from services.scoring.service import ScoringService
from shared.bus import subjects
from shared.bus.messages import Heartbeat, ModelFileUpdate, WorkerRegisteredEvent, encode
from shared.bus.runtime import listen_reports
from shared.core.placement.domain import GIB, Gpu, GpuUsage, ModelFileState, Worker
from shared.settings import Settings

NOW = 1000.0


def worker(name: str) -> Worker:
    return Worker(name=name, gpus=(Gpu(index=0, vram_total=80 * GIB),), ram_total=256 * GIB)


async def test_a_store_that_never_answers_the_read_of_an_unknown_worker_holds_up_no_other_heartbeat(
        nats_server: ServerProcess) -> None:
    # the read was awaited in the heartbeat callback: every later heartbeat of every worker waited behind it (all
    # NOT_READY 15 s later, nothing placed)
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)  # takes the connection, never answers (a hung or partitioned Redis)

    silent = await asyncio.start_server(mute, "127.0.0.1", 0)
    clock = [NOW]
    svc = FilterService(Settings(redis_url=f"redis://127.0.0.1:{silent.sockets[0].getsockname()[1]}/0"),
                        clock=lambda: clock[0])
    svc.feed.on_registered(WorkerRegisteredEvent(worker=worker("w0"), revision=1), NOW)
    nc = await nats.connect(nats_server.url)
    try:
        for subject, queue, on_report in svc._reports:
            await listen_reports(nc, subject, on_report, queue)
        await nc.flush()
        await nc.publish(subjects.worker_heartbeat("w7"), encode(Heartbeat(worker="w7")))  # its announcement missed
        for k in range(4):
            clock[0] += 1.0
            await nc.publish(subjects.worker_heartbeat("w0"),
                             encode(Heartbeat(worker="w0", seq=k, gpus=(GpuUsage(index=0, vram_used=k),))))
            await nc.flush()
            await asyncio.sleep(0.2)
        assert svc.feed.last_seen["w0"] > NOW
    finally:
        await nc.close()
        silent.close()
        for task in list(svc._reading.values()):
            task.cancel()


async def test_a_reordered_removal_of_a_stored_worker_is_undone_by_the_read_its_heartbeat_asks_for() -> None:
    # the read came back at the revision the snapshot had seen and was ignored: out for up to 50 s
    svc = FilterService(Settings(), clock=lambda: NOW)

    async def stored_inventory(name: str) -> tuple[int, Worker | None]:
        return 5_000, (worker("w1") if name == "w1" else None)

    svc.store.stored_inventory = stored_inventory  # type: ignore[method-assign]
    # forgotten and registered again at once; the two events came on two connections, the removal last
    svc.feed.on_registered(WorkerRegisteredEvent(worker=worker("w1"), revision=5_000), NOW)
    svc.feed.on_worker_removed("w1")
    assert await svc._reread("w1")
    assert svc.snapshot.worker("w1") is not None


def test_a_removed_workers_model_files_leave_the_snapshot_with_it() -> None:
    # kept, they steered placements to a machine that came back under the name with an empty disk
    svc = ScoringService(Settings(), clock=lambda: NOW)
    svc.feed.on_registered(WorkerRegisteredEvent(worker=worker("w1"), revision=1), NOW)
    svc.feed.on_file(ModelFileUpdate(worker="w1", source="org/m", state=ModelFileState.READY, progress=1.0))
    assert svc.snapshot.model_file_ready("org/m", "w1")
    svc.feed.on_worker_removed("w1")
    svc.feed.on_registered(WorkerRegisteredEvent(worker=worker("w1"), revision=2), NOW)
    assert not svc.snapshot.model_file_ready("org/m", "w1") and svc.snapshot.model_files() == []


def test_a_file_report_of_a_worker_the_snapshot_does_not_hold_is_left_out() -> None:
    # the state writer refuses it; every scoring replica applied it
    svc = ScoringService(Settings(), clock=lambda: NOW)
    svc.feed.on_file(ModelFileUpdate(worker="ghost", source="org/m", state=ModelFileState.READY, progress=1.0))
    assert svc.snapshot.model_files() == []
