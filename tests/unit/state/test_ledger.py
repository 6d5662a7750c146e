"""The claims ledger: one atomic compare-and-set over every GPU of a candidate, idempotent."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from shared.core.placement.domain import GIB, Gpu, Instance, InstanceState, SubordinateWorker, Worker
from shared.state import CommitItem, StateStore


def worker(name: str, gpus: int = 2, vram: int = 80 * GIB) -> Worker:
    return Worker(
        name=name, gpus=tuple(Gpu(index=i, vram_total=vram) for i in range(gpus)), ram_total=512 * GIB
    )


async def pending(store: StateStore, *ids: str, model: str = "m") -> None:
    token = await store.lock_model(model)
    assert token
    await store.create_pending(model, token, [Instance(id=i, model=model) for i in ids])
    await store.unlock_model(model, token)


def placed(iid: str, w: str, gpus: tuple[int, ...], gib: int, subs: tuple[SubordinateWorker, ...] = ()) -> CommitItem:
    return CommitItem(
        Instance(
            id=iid, model="m", state=InstanceState.SCHEDULED, worker=w, gpu_indexes=gpus,
            vram_claims=tuple(gib * GIB for _ in gpus), subordinates=subs,
        )
    )


async def test_commit_writes_claims_and_schedules_the_instance(store: StateStore) -> None:
    await store.register_workers([worker("w1")])
    await pending(store, "a")
    assert await store.commit([placed("a", "w1", (0, 1), 40)]) == ["ok"]
    assert (await store.ledger())["w1:0"] == (40 * GIB, 80 * GIB)
    inst = await store.instance("a")
    assert inst is not None and inst.state is InstanceState.SCHEDULED and inst.worker == "w1"


async def test_commit_is_refused_whole_when_any_gpu_lacks_room(store: StateStore) -> None:
    await store.register_workers([worker("w1"), worker("w2")])
    await pending(store, "a", "b")
    assert await store.commit([placed("a", "w2", (1,), 50)]) == ["ok"]
    sub = SubordinateWorker(worker="w2", gpu_indexes=(0, 1), vram_claims=(40 * GIB, 40 * GIB))
    verdict = await store.commit([placed("b", "w1", (0, 1), 40, (sub,))])
    assert verdict == ["full:w2:1"]
    ledger = await store.ledger()
    assert ledger["w1:0"][0] == 0 and ledger["w2:0"][0] == 0 and ledger["w2:1"][0] == 50 * GIB
    inst = await store.instance("b")
    assert inst is not None and inst.state is InstanceState.PENDING


async def test_redelivered_commit_is_recognised_and_claims_once(store: StateStore) -> None:
    await store.register_workers([worker("w1")])
    await pending(store, "a")
    item = placed("a", "w1", (0,), 30)
    assert await store.commit([item]) == ["ok"]
    assert await store.commit([item]) == ["dup"]
    assert (await store.ledger())["w1:0"][0] == 30 * GIB


async def test_commit_of_a_removed_instance_is_gone(store: StateStore) -> None:
    await store.register_workers([worker("w1")])
    await pending(store, "a")
    await store.release(["a"])
    assert await store.commit([placed("a", "w1", (0,), 30)]) == ["gone"]
    assert (await store.ledger())["w1:0"][0] == 0


async def test_commit_on_unknown_gpu_is_refused(store: StateStore) -> None:
    await store.register_workers([worker("w1")])
    await pending(store, "a")
    assert await store.commit([placed("a", "w1", (7,), 1)]) == ["full:w1:7"]


async def test_release_is_idempotent_and_frees_every_gpu(store: StateStore) -> None:
    await store.register_workers([worker("w1")])
    await pending(store, "a")
    await store.commit([placed("a", "w1", (0, 1), 40)])
    assert await store.release(["a"]) == 1
    assert await store.release(["a"]) == 0
    assert all(used == 0 for used, _ in (await store.ledger()).values())
    assert await store.instance("a") is None
    assert await store.instances("m") == []


async def test_release_to_unreachable_keeps_the_record(store: StateStore) -> None:
    await store.register_workers([worker("w1")])
    await pending(store, "a")
    await store.commit([placed("a", "w1", (0,), 40)])
    await store.release(["a"], mode=InstanceState.UNREACHABLE.value)
    inst = await store.instance("a")
    assert inst is not None and inst.state is InstanceState.UNREACHABLE
    assert (await store.ledger())["w1:0"][0] == 0


@pytest.mark.parametrize(
    ("start", "report", "applied"),
    [
        (InstanceState.SCHEDULED, InstanceState.STARTING, True),
        (InstanceState.STARTING, InstanceState.RUNNING, True),
        (InstanceState.DRAINING, InstanceState.RUNNING, False),
        (InstanceState.UNREACHABLE, InstanceState.RUNNING, False),
        (InstanceState.RUNNING, InstanceState.STARTING, False),
        (InstanceState.SCHEDULED, InstanceState.RUNNING, True),
        (InstanceState.RUNNING, InstanceState.ERROR, True),
        (InstanceState.ERROR, InstanceState.RUNNING, True),
        # the reconciler's states are never a worker's to report, from any state (an ERROR replica moved back to
        # PENDING kept its claims and was never replaced)
        (InstanceState.ERROR, InstanceState.PENDING, False),
        (InstanceState.ERROR, InstanceState.DRAINING, False),
        (InstanceState.ERROR, InstanceState.UNREACHABLE, False),
        (InstanceState.RUNNING, InstanceState.DRAINING, False),
        (InstanceState.SCHEDULED, InstanceState.PENDING, False),
    ],
)
async def test_status_reports_follow_allowed_transitions(
    store: StateStore, start: InstanceState, report: InstanceState, applied: bool
) -> None:
    await store.register_workers([worker("w1")])
    await pending(store, "a")
    await store.commit([placed("a", "w1", (0,), 10)])
    await store.r.hset("gantry:inst:state", "a", start.value)
    (prev,) = await store.set_states([("a", "w1", report)])
    assert (prev is not None) is applied


async def test_a_decision_naming_another_model_than_its_pending_replica_is_refused_unwritten(
    store: StateStore,
) -> None:
    await store.register_workers([worker("w1")])
    await pending(store, "a")
    other = dataclasses.replace(placed("a", "w1", (0,), 10), instance=Instance(
        id="a", model="other", state=InstanceState.SCHEDULED, worker="w1", gpu_indexes=(0,), vram_claims=(10 * GIB,)))
    assert await store.commit([other]) == ["invalid:model"]
    assert (await store.ledger())["w1:0"] == (0, 80 * GIB)
    assert (await store.instance("a")).state is InstanceState.PENDING  # type: ignore[union-attr]


async def test_a_scale_down_removes_only_the_replicas_still_pending(store: StateStore) -> None:
    await store.register_workers([worker("w1")])
    await pending(store, "a", "b")
    assert await store.commit([placed("a", "w1", (0,), 10)]) == ["ok"]  # placed since the scale-down read them
    assert await store.remove_pending(["a", "b", "gone"]) == ["b"]
    assert (await store.instance("a")).state is InstanceState.SCHEDULED  # type: ignore[union-attr]
    assert await store.instance("b") is None
    assert (await store.ledger())["w1:0"] == (10 * GIB, 80 * GIB)


async def test_status_report_from_another_worker_is_ignored(store: StateStore) -> None:
    await store.register_workers([worker("w1")])
    await pending(store, "a")
    await store.commit([placed("a", "w1", (0,), 10)])
    assert await store.set_states([("a", "w9", InstanceState.RUNNING)]) == [None]


async def test_a_batch_of_status_reports_is_applied_in_order(store: StateStore) -> None:
    await store.register_workers([worker("w1")])
    await pending(store, "a", "b")
    await store.commit([placed("a", "w1", (0,), 10), placed("b", "w1", (1,), 10)])
    prevs = await store.set_states([
        ("a", "w1", InstanceState.STARTING), ("a", "w1", InstanceState.RUNNING),
        ("b", "w1", InstanceState.RUNNING), ("b", "w1", InstanceState.STARTING), ("gone", "w1", InstanceState.RUNNING),
    ])
    assert prevs == [InstanceState.SCHEDULED, InstanceState.STARTING, InstanceState.SCHEDULED, None, None]
    assert [(await store.instance(i)).state for i in "ab"] == [InstanceState.RUNNING] * 2  # type: ignore[union-attr]


async def test_writes_under_a_lost_lock_are_refused(store: StateStore) -> None:
    token = await store.lock_model("m", ttl_s=0.05)
    assert token and await store.lock_model("m") is None
    await asyncio.sleep(0.1)
    assert not await store.create_pending("m", token, [Instance(id="x", model="m")])
    assert await store.instances("m") == []


async def test_concurrent_commits_never_overbook(store: StateStore) -> None:
    await store.register_workers([worker("w1", gpus=1)])
    ids = [f"i{n}" for n in range(40)]
    await pending(store, *ids)
    results = await asyncio.gather(*(store.commit([placed(i, "w1", (0,), 7)]) for i in ids))
    assert sum(r == ["ok"] for r in results) == 11
    assert await store.overbooked() == []
    assert await store.claims_consistent() == []


async def test_a_replayed_commit_call_answers_what_its_first_run_answered_and_claims_once(store: StateStore) -> None:
    # The client resends a call whose connection failed after the write (it cannot know whether the script ran):
    # the replay must not turn the first run's "ok" into "dup", whose handling skips what "ok" does (the
    # placement's decision event and SLI); a replica requested twice in the call stays "ok" then "dup".
    await store.register_workers([worker("w1")])
    await pending(store, "a", "b")
    items = [placed("a", "w1", (0,), 30), placed("a", "w1", (1,), 30), placed("b", "w1", (1,), 10)]
    first = await store.commit(items, call="c1")
    assert first == ["ok", "dup", "ok"]
    assert await store.commit(items, call="c1") == first
    assert await store.commit(items, call="c2") == ["dup", "dup", "dup"]  # another call: a redelivery
    ledger = await store.ledger()
    assert ledger["w1:0"][0] == 30 * GIB and ledger["w1:1"][0] == 10 * GIB
    assert await store.claims_consistent() == []


async def test_items_named_as_a_failed_call_named_them_answer_ok_for_what_it_committed(store: StateStore) -> None:
    # A caller whose commit call failed outright (its replies all lost) sends the items again in a new call under
    # the names the failed call gave them: what that call committed is "ok" again, anything else is judged anew.
    await store.register_workers([worker("w1")])
    await pending(store, "a", "b")
    assert await store.commit([placed("a", "w1", (0,), 30)], call="lost") == ["ok"]
    a_again = dataclasses.replace(placed("a", "w1", (0,), 30), by="lost:1")
    a_elsewhere = dataclasses.replace(placed("a", "w1", (1,), 30), by="lost:9")  # not what "lost" committed
    b_first = dataclasses.replace(placed("b", "w1", (1,), 10), by="lost:2")  # never committed: committed now
    assert await store.commit([a_again, a_elsewhere, b_first], call="retry") == ["ok", "dup", "ok"]
    assert await store.commit([placed("a", "w1", (0,), 30)], call="other") == ["dup"]
    assert await store.claims_consistent() == []


async def test_release_forgets_which_call_committed_the_replica(store: StateStore) -> None:
    await store.register_workers([worker("w1")])
    await pending(store, "a")
    await store.commit([placed("a", "w1", (0,), 30)], call="c1")
    assert await store.r.hkeys("gantry:claims:by") == [b"a"]
    await store.release(["a"])
    assert await store.r.hkeys("gantry:claims:by") == []
