"""One inventory per worker: the state writer's stored record, the ledger's capacity and every service's snapshot
(issues 12 and 13). A registration that the writer stores, refuses or repairs reaches the snapshots only as the
writer's announcement of what it stored, so no service places on a GPU the ledger has no capacity for, and the
ledger keeps no capacity for a GPU the stored inventory lost.

The case that broke it (found by the fuzz suite): a schema-valid registration under a real worker's name (its
own identity: a compromised or confused agent) that drops a GPU without claims and reports more RAM than the
machine has. It is stored (nothing it changes is claimed); the worker's own next registration must then repair
it everywhere, and every GPU must be usable again.
"""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from nats.aio.msg import Msg

from bench.adversary.fuzz import junk
from shared.bus import subjects
from shared.bus.messages import WorkerRegisteredEvent, WorkerRegistration, encode
from shared.core.placement.domain import GIB, Gpu, InstanceState, ModelSpec, Worker

from .conftest import Stack, wait_until
from .test_attacks import connect_as, settled

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ONE_PER_GPU = ModelSpec(name="solo", source="x/solo", weight_bytes=8 * GIB, vram_claim=70 * GIB)


def forged(name: str, keep: int) -> Worker:
    """``name`` with one of its two GPUs (the other dropped) and 4 TiB of RAM (the machine has 1 TiB)."""
    return Worker(name=name, gpus=(Gpu(index=keep, vram_total=80 * GIB),), ram_total=4 << 40)


async def test_a_forged_inventory_is_stored_announced_and_repaired_everywhere(stack: Stack) -> None:
    stack.start_workers("fleet", "--count", "2", "--gpus", "2", "--heartbeat-interval", "0.2")
    stack.start_services()
    await stack.wait_ready(workers=2)
    announced: list[WorkerRegisteredEvent] = []

    async def on_announcement(msg: Msg) -> None:
        announced.append(msgspec.json.decode(msg.data, type=WorkerRegisteredEvent))

    await stack.nc.subscribe(subjects.EVENT_WORKER_REGISTERED, cb=on_announcement)
    await stack.scale(ONE_PER_GPU, 1)
    await wait_until(lambda: settled(stack, "solo", 1, 0), 30, "the first replica")
    (inst,) = await stack.instances("solo")
    assert inst.worker is not None
    victim, held = inst.worker, inst.gpu_indexes[0]

    def gpus_announced() -> list[int]:
        return [len(ev.worker.gpus) for ev in announced if ev.worker.name == victim]

    # Right after one of the worker's own periodic registrations, so that the next one is seconds away (a
    # registration in the same write batch would replace the forged one before it is stored).
    nc, _ = await connect_as(stack, f"worker-{victim}")
    try:
        announced.clear()
        await wait_until(lambda: _true(gpus_announced() == [2]), 30, "a periodic registration of the worker")
        await nc.publish(subjects.worker_register(victim), encode(WorkerRegistration(worker=forged(victim, held))))
        await nc.flush()
    finally:
        await nc.close()

    # The writer stored the forged inventory and said so; the worker's own registration then repaired it.
    await wait_until(lambda: _true(1 in gpus_announced()), 30, "the forged inventory announced as stored")
    await wait_until(lambda: _true(gpus_announced()[-1] == 2), 30, "the real inventory announced again")
    revisions = [ev.revision for ev in announced if ev.worker.name == victim]
    assert revisions == sorted(revisions), "announcements of one worker leave the writer in store order"

    async def agree() -> bool:  # stored inventory == last announcement == ledger capacity, nothing else stored
        stored = {w.name: w for w in await stack.store.workers()}
        last = [ev.worker for ev in announced if ev.worker.name == victim][-1]
        mine = stored[victim]
        same = [(g.index, g.vram_total) for g in mine.gpus] == [(g.index, g.vram_total) for g in last.gpus]
        return same and mine.ram_total == last.ram_total == 1024 * GIB and await junk(
            stack.store, {"w0", "w1"}, {"solo"}) == []

    await wait_until(agree, 30, f"one inventory everywhere (junk: {await junk(stack.store, {'w0', 'w1'}, {'solo'})})")
    # Every GPU is usable again: one replica per GPU on all four, none stranded on a refused commit.
    await stack.scale(ONE_PER_GPU, 4)
    await wait_until(lambda: settled(stack, "solo", 4, 0), 20, "four replicas RUNNING, one per GPU")
    placed = {(i.worker, i.gpu_indexes) for i in await stack.instances("solo")}
    assert len(placed) == 4
    assert await stack.store.overbooked() == [] and await stack.store.claims_consistent() == []
    assert stack.crashed() == []
    states = await stack.states("solo")
    assert states.get(InstanceState.PENDING, 0) == 0


async def _true(value: bool) -> bool:
    await asyncio.sleep(0)
    return value
