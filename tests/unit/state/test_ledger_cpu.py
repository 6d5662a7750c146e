"""The claims ledger holds CPU too (issue 19): a worker's milli-cores are claimed in the same atomic step as its
GPUs and RAM, so racing placements cannot overbook a worker's CPU."""

from __future__ import annotations

import asyncio

from shared.core.placement.domain import GIB, Gpu, Instance, InstanceState, SubordinateWorker, Worker
from shared.state import CommitItem, StateStore
from tests.unit.state.test_ledger import pending


def cpu_worker(name: str, cores: int, gpus: int = 8) -> Worker:
    return Worker(name=name, gpus=tuple(Gpu(index=i, vram_total=80 * GIB) for i in range(gpus)),
                  ram_total=512 * GIB, cpu_total=cores * 1000)


def on_gpu(iid: str, w: str, gpu: int, cores: int, subs: tuple[SubordinateWorker, ...] = ()) -> CommitItem:
    return CommitItem(Instance(id=iid, model="m", state=InstanceState.SCHEDULED, worker=w, gpu_indexes=(gpu,),
                               vram_claims=(10 * GIB,), cpu_claim=cores * 1000, subordinates=subs))


async def cpu_used(store: StateStore, worker: str) -> int:
    return int(await store.r.hget("gantry:cpu:used", worker) or 0)


async def test_concurrent_commits_never_overbook_a_workers_cpu(store: StateStore) -> None:
    # 8 GPUs with room for all, 16 cores: only two replicas of 6 cores fit (the third would need 18)
    await store.register_workers([cpu_worker("w1", cores=16)])
    ids = [f"i{n}" for n in range(8)]
    await pending(store, *ids)
    results = await asyncio.gather(*(store.commit([on_gpu(i, "w1", n, 6)]) for n, i in enumerate(ids)))
    assert sum(r == ["ok"] for r in results) == 2
    assert all(r == ["ok"] or r == ["full:w1"] for r in results)
    assert await cpu_used(store, "w1") == 12_000
    assert await store.overbooked() == []


async def test_a_commit_short_of_cpu_on_a_subordinate_writes_no_claim_at_all(store: StateStore) -> None:
    await store.register_workers([cpu_worker("w1", cores=64), cpu_worker("w2", cores=4)])
    await pending(store, "a")
    sub = SubordinateWorker(worker="w2", gpu_indexes=(0,), vram_claims=(10 * GIB,), cpu_claim=8000)
    assert await store.commit([on_gpu("a", "w1", 0, 8, (sub,))]) == ["full:w2"]
    assert await cpu_used(store, "w1") == 0 and await cpu_used(store, "w2") == 0
    assert all(used == 0 for used, _ in (await store.ledger()).values())


async def test_release_gives_the_cpu_back_once(store: StateStore) -> None:
    await store.register_workers([cpu_worker("w1", cores=8)])
    await pending(store, "a", "b")
    assert await store.commit([on_gpu("a", "w1", 0, 8)]) == ["ok"]
    assert await store.commit([on_gpu("b", "w1", 1, 1)]) == ["full:w1"]
    assert await store.release(["a"]) == 1
    assert await store.release(["a"]) == 0
    assert await cpu_used(store, "w1") == 0
    assert await store.commit([on_gpu("b", "w1", 1, 1)]) == ["ok"]


async def test_a_worker_without_a_cpu_count_never_refuses_cpu_but_counts_it(store: StateStore) -> None:
    await store.register_workers([cpu_worker("w1", cores=0)])
    await pending(store, "a")
    assert await store.commit([on_gpu("a", "w1", 0, 500)]) == ["ok"]
    assert await cpu_used(store, "w1") == 500_000


async def test_a_worker_that_stops_reporting_its_cpu_count_is_no_longer_limited(store: StateStore) -> None:
    await store.register_workers([cpu_worker("w1", cores=2)])
    await store.register_workers([cpu_worker("w1", cores=0)])
    await pending(store, "a")
    assert await store.commit([on_gpu("a", "w1", 0, 4)]) == ["ok"]


async def test_a_worker_holding_cpu_claims_is_not_forgotten(store: StateStore) -> None:
    await store.register_workers([cpu_worker("w1", cores=8, gpus=0)])
    await pending(store, "a")
    item = CommitItem(Instance(id="a", model="m", state=InstanceState.SCHEDULED, worker="w1", cpu_claim=2000))
    assert await store.commit([item]) == ["ok"]
    assert await store.forget_worker("w1", None) == "holds"
    await store.release(["a"])
    assert await store.forget_worker("w1", None) == "ok"
    assert await store.r.hget("gantry:cpu:cap", "w1") is None
