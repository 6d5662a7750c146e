"""Worker and replica lifecycle in the state layer: forgetting workers (never under a live claim), failures, retries."""

from __future__ import annotations

from shared.core.placement.domain import GIB, Gpu, Instance, InstanceState, ModelFile, ModelFileState, Worker
from shared.state import CommitItem, StateStore
from shared.state.store import Keys


def worker(name: str, gpus: int = 2) -> Worker:
    return Worker(name=name, gpus=tuple(Gpu(index=i, vram_total=80 * GIB) for i in range(gpus)), ram_total=GIB)


async def seed(store: StateStore, name: str, seen: float) -> None:
    await store.register_workers([worker(name)])
    await store.r.hset(Keys.seen, name, repr(seen))
    await store.set_cordon(name, True, 1, seq=5)
    await store.set_cordon(name, False, seq=6)
    await store.set_model_files([ModelFile(source="org/m", worker=name, state=ModelFileState.READY)])


async def test_a_forgotten_worker_leaves_every_hash(store: StateStore) -> None:
    await seed(store, "gone", 100.0)
    await seed(store, "stays", 100.0)
    assert await store.forget_worker("gone", cutoff=200.0) == "ok"
    assert await store.worker_names() == {"stays"}
    assert [w.name for w in await store.workers()] == ["stays"]
    assert set(await store.ledger()) == {"stays:0", "stays:1"}
    assert await store.cordons() == {"stays:1"}
    assert set(await store.r.hkeys(Keys.cordon_seq)) == {b"stays", b"stays:1"}
    assert [f.worker for f in await store.model_files()] == ["stays"]


async def test_a_worker_heard_after_the_cutoff_is_kept(store: StateStore) -> None:
    await seed(store, "back", 300.0)
    assert await store.forget_worker("back", cutoff=200.0) == "alive"
    assert await store.worker_names() == {"back"}


async def test_a_worker_whose_gpus_carry_claims_is_kept(store: StateStore) -> None:
    await seed(store, "busy", 100.0)
    token = await store.lock_model("m")
    assert token
    await store.create_pending("m", token, [Instance(id="a", model="m")])
    await store.unlock_model("m", token)
    rec = Instance(id="a", model="m", state=InstanceState.SCHEDULED, worker="busy", gpu_indexes=(0,),
                   vram_claims=(GIB,))
    assert await store.commit([CommitItem(rec)]) == ["ok"]
    assert await store.forget_worker("busy", cutoff=None) == "holds"
    await store.release(["a"])
    assert await store.forget_worker("busy", cutoff=None) == "ok"


async def test_forgetting_an_unknown_worker_is_harmless(store: StateStore) -> None:
    assert await store.forget_worker("never", cutoff=None) == "ok"


async def test_failures_keep_the_first_report(store: StateStore) -> None:
    await store.record_failures({"a": (10.0, "OOM")})
    await store.record_failures({"a": (20.0, "again")})
    assert await store.failures() == {"a": (10.0, "OOM")}
    await store.forget_failures(["a"])
    assert await store.failures() == {}


async def test_a_registration_counts_as_hearing_from_the_worker(store: StateStore) -> None:
    await store.register_workers([worker("w1")], seen_at=500.0)
    (w,) = await store.workers()
    assert w.last_heartbeat == 500.0
    assert await store.forget_worker("w1", cutoff=400.0) == "alive"


async def test_the_retry_book_round_trips_never_requested_as_minus_infinity(store: StateStore) -> None:
    await store.set_retries({"a": (2, 10.0, 8.0), "b": (0, 5.0, float("-inf"))})
    assert await store.retries() == {"a": (2, 10.0, 8.0), "b": (0, 5.0, float("-inf"))}
    assert await store.retries(["b", "zz"]) == {"b": (0, 5.0, float("-inf"))}
    assert await store.retries([]) == {}
    await store.forget_retries(["a"])
    assert set(await store.retries()) == {"b"}
