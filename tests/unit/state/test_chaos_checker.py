"""The chaos suite's ledger checker finds what it must: a GPU over capacity, a ledger out of step with the
claims, claims held by an instance in a state that holds none (and the reverse)."""

from __future__ import annotations

from bench.adversary.chaos import ledger_violations
from shared.state import StateStore


async def seed(store: StateStore, used: int, claim: int, state: str) -> None:
    await store.r.hset("gantry:gpu:cap", "w0:0", 100)
    await store.r.hset("gantry:gpu:used", "w0:0", used)
    await store.r.hset("gantry:claims", "m-1", f"g|w0:0|{claim}")
    await store.r.hset("gantry:inst:state", "m-1", state)


async def test_a_consistent_ledger_has_no_violation(store: StateStore) -> None:
    await seed(store, 60, 60, "RUNNING")
    assert await ledger_violations(store) == ([], [])


async def test_a_gpu_over_capacity_is_reported(store: StateStore) -> None:
    await seed(store, 160, 160, "RUNNING")
    over, _ = await ledger_violations(store)
    assert over == ["w0:0: 160 > 100"]


async def test_a_ledger_that_differs_from_the_claims_is_reported(store: StateStore) -> None:
    await seed(store, 60, 50, "RUNNING")
    assert (await ledger_violations(store))[1] == ["w0:0: ledger 60 != claims 50"]


async def test_claims_of_a_pending_instance_and_a_running_one_without_claims_are_reported(store: StateStore) -> None:
    await seed(store, 60, 60, "PENDING")
    await store.r.hset("gantry:inst:state", "m-2", "RUNNING")
    assert (await ledger_violations(store))[1] == ["m-1: claims while PENDING", "m-2: RUNNING without claims"]
