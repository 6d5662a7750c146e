"""Storing a registration: one step per worker over the record it was checked against, the ledger's capacity
always that of the stored inventory, never changed under a live claim, and a revision that only grows."""

from __future__ import annotations

import msgspec

from shared.bus.messages import WorkerRegisteredEvent
from shared.core.placement.domain import GIB, Gpu, Instance, InstanceState, Worker
from shared.core.placement.snapshot import ClusterSnapshot, SnapshotConfig
from shared.host.feed import SnapshotFeed
from shared.state import CommitItem, StateStore
from shared.state.store import Keys


def worker(*vram_gib: int, ram_gib: int = 512, name: str = "w1") -> Worker:
    return Worker(name=name, gpus=tuple(Gpu(index=i, vram_total=v * GIB) for i, v in enumerate(vram_gib)),
                  ram_total=ram_gib * GIB)


async def claim(store: StateStore, gpu: int, gib: int = 40, ram_gib: int = 0) -> None:
    token = await store.lock_model("m")
    assert token
    await store.create_pending("m", token, [Instance(id="a", model="m")])
    await store.unlock_model("m", token)
    inst = Instance(id="a", model="m", state=InstanceState.SCHEDULED, worker="w1", gpu_indexes=(gpu,),
                    vram_claims=(gib * GIB,), ram_claim=ram_gib * GIB)
    assert await store.commit([CommitItem(inst)]) == ["ok"]


async def test_a_gpu_that_leaves_the_inventory_leaves_the_ledger(store: StateStore) -> None:
    await store.register_workers([worker(80, 80)])
    verdicts = await store.register_workers([worker(80)])
    assert verdicts["w1"].isdigit()
    assert set(await store.ledger()) == {"w1:0"}
    (stored,) = await store.workers()
    assert [g.index for g in stored.gpus] == [0]


async def test_a_gpu_that_holds_claims_keeps_its_capacity_whatever_the_registration(store: StateStore) -> None:
    await store.register_workers([worker(80, 80)])
    await claim(store, gpu=1)
    assert await store.register_workers([worker(80)]) == {"w1": "held:w1:1"}
    assert await store.register_workers([worker(80, 120)]) == {"w1": "held:w1:1"}
    assert (await store.ledger())["w1:1"] == (40 * GIB, 80 * GIB)
    (stored,) = await store.workers()
    assert [g.vram_total for g in stored.gpus] == [80 * GIB, 80 * GIB]


async def test_ram_may_not_fall_below_its_claims_but_may_shrink_above_them(store: StateStore) -> None:
    await store.register_workers([worker(80, ram_gib=4096)])
    await claim(store, gpu=0, ram_gib=100)
    assert await store.register_workers([worker(80, ram_gib=64)]) == {"w1": "held:w1"}
    assert (await store.register_workers([worker(80, ram_gib=1024)]))["w1"].isdigit()


async def test_a_change_checked_against_an_older_record_is_not_stored(store: StateStore) -> None:
    await store.register_workers([worker(80, 80)])
    checked = await store.r.hget(Keys.workers, "w1")
    await store.register_workers([worker(80, 80, 80)])  # another writer stored a newer one meanwhile
    assert await store.register_workers([worker(80)], expected={"w1": checked}) == {"w1": "stale"}
    assert await store.register_workers([worker(80)], expected={"w1": None}) == {"w1": "stale"}
    assert len((await store.workers())[0].gpus) == 3
    fresh = await store.r.hget(Keys.workers, "w1")
    assert (await store.register_workers([worker(80)], expected={"w1": fresh}))["w1"].isdigit()


async def test_every_store_has_a_newer_revision_and_reads_after_it_see_it(store: StateStore) -> None:
    seen = []
    for n in range(5):
        verdicts = await store.register_workers([worker(80, name="w1"), worker(80, name=f"x{n}")])
        seen += [int(verdicts["w1"]), int(verdicts[f"x{n}"])]
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert await store.registration_revision() == seen[-1]
    await store.r.set(Keys.registered, str(seen[-1] + 10**12))  # a clock behind the last revision (restart)
    assert int((await store.register_workers([worker(80)]))["w1"]) == seen[-1] + 10**12 + 1


async def test_a_registration_counts_as_hearing_from_the_worker(store: StateStore) -> None:
    await store.register_workers([worker(80)], seen_at=500.0)
    (stored,) = await store.workers()
    assert stored.last_heartbeat == 500.0 and msgspec.structs.replace(stored, last_heartbeat=0.0) == worker(80)


def feed() -> SnapshotFeed:
    return SnapshotFeed(ClusterSnapshot(SnapshotConfig(heartbeat_interval=5.0, not_ready_after=15.0)))


async def test_a_snapshot_loaded_after_registrations_ignores_their_announcements_but_not_newer_ones(
    store: StateStore,
) -> None:
    old = int((await store.register_workers([worker(80, 80)]))["w1"])  # announced before this service started
    f = feed()
    await f.load(store)
    assert len(f.inventory["w1"].gpus) == 2
    f.on_registered(WorkerRegisteredEvent(worker=worker(80, 80, 80), revision=old), now=1.0)  # late duplicate
    assert len(f.inventory["w1"].gpus) == 2
    new = int((await store.register_workers([worker(80)]))["w1"])
    f.on_registered(WorkerRegisteredEvent(worker=worker(80), revision=new), now=2.0)
    assert len(f.inventory["w1"].gpus) == 1


async def test_an_announcement_newer_than_the_load_wins_over_the_loaded_record(store: StateStore) -> None:
    await store.register_workers([worker(80, 80)])
    f = feed()
    # Applied while the load was under way (the subscription starts first): the load must not undo it.
    f.on_registered(WorkerRegisteredEvent(worker=worker(80), revision=await store.registration_revision() + 1), 1.0)
    await f.load(store)
    assert len(f.inventory["w1"].gpus) == 1


async def test_a_worker_removed_while_the_load_reads_the_workers_stays_out_of_the_snapshot(
    store: StateStore,
) -> None:
    await store.register_workers([worker(80, name="w1"), worker(80, name="w2")])
    f = feed()
    read = store.worker_records

    async def overtaken() -> tuple[list[Worker], dict[str, str]]:
        stale = await read()  # holds w1 still: the writer deletes it right after, then announces the removal
        f.on_worker_removed("w1")  # heard before the load applies what it read
        return stale

    store.worker_records = overtaken  # type: ignore[method-assign]
    await f.load(store)
    assert "w1" not in f.inventory and f.snapshot.worker("w1") is None  # removals carry no revision to compare
    assert "w2" in f.inventory
