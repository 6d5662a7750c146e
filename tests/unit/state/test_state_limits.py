"""The state layer stores nothing outside the limits, and a record stored before a limit existed never
crashes a reader (issue 12, case 2: one 2**64-byte registration crash-looped every service)."""

from __future__ import annotations

import msgspec
import pytest

from shared.core.placement.domain import GIB, Gpu, Instance, ModelSpec, Worker
from shared.core.placement.snapshot import ClusterSnapshot, SnapshotConfig
from shared.host.feed import SnapshotFeed
from shared.state import StateStore
from shared.state.store import CommitItem, InvalidRecord

GOOD = Worker(name="w0", gpus=(Gpu(index=0, vram_total=80 * GIB),), ram_total=512 * GIB)
HUGE = Worker(name="w1", gpus=(Gpu(index=0, vram_total=2**64),), ram_total=512 * GIB)


async def test_a_registration_past_the_physical_bounds_is_refused(store: StateStore) -> None:
    with pytest.raises(InvalidRecord, match="refusing to store worker 'w1'"):
        await store.register_workers([HUGE])
    assert await store.worker_names() == set()


async def test_a_huge_registration_stored_before_the_limit_does_not_stop_the_snapshot_loading(
    store: StateStore,
) -> None:
    await store.register_workers([GOOD])
    await store.r.hset("gantry:workers", "w1", msgspec.json.encode(HUGE))  # written past this layer
    feed = SnapshotFeed(ClusterSnapshot(SnapshotConfig()))
    await feed.load(store)
    assert sorted(feed.inventory) == ["w0"]


async def test_a_spec_with_a_negative_claim_is_refused(store: StateStore) -> None:
    bad = ModelSpec(name="m", vram_claim=-80 * GIB)
    with pytest.raises(InvalidRecord):
        await store.set_model(bad, "m", 1)
    assert await store.models() == {}


async def test_a_commit_with_a_negative_claim_is_refused_and_the_ledger_untouched(store: StateStore) -> None:
    await store.register_workers([GOOD])
    inst = Instance(id="m-1", model="m", worker="w0", gpu_indexes=(0,), vram_claims=(-80 * GIB,))
    await store.r.hset("gantry:inst:state", "m-1", "PENDING")
    (verdict,) = await store.commit([CommitItem(inst)])
    assert verdict.startswith("invalid:")
    assert await store.ledger() == {"w0:0": (0, 80 * GIB)}


async def test_the_commit_script_refuses_a_negative_amount_itself(store: StateStore) -> None:
    await store.register_workers([GOOD])
    await store.r.hset("gantry:inst:state", "m-1", "PENDING")
    record = msgspec.json.encode(Instance(id="m-1", model="m"))
    keys = ["gantry:gpu:cap", "gantry:gpu:used", "gantry:ram:cap", "gantry:ram:used", "gantry:claims",
            "gantry:inst", "gantry:inst:state", "gantry:inst:reason", "gantry:inst:worker"]
    got = await store._commit(keys=keys, args=[1, "call", 0, "m-1", "", "w0", record, 1, "g", "w0:0", -5])
    assert [v.decode() for v in got] == ["invalid:w0:0"]
    assert await store.ledger() == {"w0:0": (0, 80 * GIB)}
