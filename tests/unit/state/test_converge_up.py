"""The one-call scale-up converge: scale commands recorded in order, missing replicas created atomically."""

from __future__ import annotations

import asyncio

import pytest
import redis.exceptions

from shared.core.limits import MAX_REPLICAS
from shared.core.placement.domain import GIB, Gpu, Instance, InstanceState, ModelSpec, Worker
from shared.core.placement.reconcile import ACTIVE
from shared.state import StateStore
from shared.state.store import CONVERGE_BUDGET, CommitItem, InvalidRecord, Keys, ScaleUp, _record_template

SPEC = ModelSpec(name="m", weight_bytes=2 * GIB)


async def test_a_scale_command_creates_the_missing_replicas_as_pending(store: StateStore) -> None:
    (res,) = await store.converge_up([ScaleUp(model="m", replicas=3, spec=SPEC, seq=1, created_at=5.0)], ACTIVE)
    assert (res.status, res.applied, res.desired, len(res.created)) == ("ok", True, 3, 3)
    stored = await store.instances("m")
    assert sorted(i.id for i in stored) == sorted(i.id for i in res.created)
    assert all(i.state is InstanceState.PENDING and i.created_at == 5.0 and i.model == "m" for i in stored)
    assert (await store.desired()).get("m") == 3 and await store.model("m") == SPEC


async def test_replicas_already_there_are_not_created_again(store: StateStore) -> None:
    await store.converge_up([ScaleUp(model="m", replicas=2, spec=SPEC, seq=1)], ACTIVE)
    (res,) = await store.converge_up([ScaleUp(model="m", replicas=3, spec=SPEC, seq=2)], ACTIVE)
    assert len(res.created) == 1 and len(await store.instances("m")) == 3
    (again,) = await store.converge_up([ScaleUp(model="m")], ACTIVE)
    assert again.created == () and not again.applied and again.desired == 3


async def test_pending_replicas_without_a_reason_are_reported_unrequested(store: StateStore) -> None:
    (first,) = await store.converge_up([ScaleUp(model="m", replicas=2, spec=SPEC, seq=1)], ACTIVE)
    await store.set_reasons({first.created[0].id: "no GPU"})
    (res,) = await store.converge_up([ScaleUp(model="m")], ACTIVE)
    assert res.unrequested == (first.created[1].id,)


async def test_a_model_with_more_replicas_than_one_lookup_can_hold_is_counted_whole(store: StateStore) -> None:
    # Past ~8,000 ids a single HMGET's argument list no longer unpacks in the script: it reads in chunks.
    (first,) = await store.converge_up([ScaleUp(model="m", replicas=8500, spec=SPEC, seq=1)], ACTIVE)
    await store.set_reasons({i.id: "no GPU" for i in first.created[:8499]})
    (res,) = await store.converge_up([ScaleUp(model="m", replicas=8501, spec=SPEC, seq=2)], ACTIVE)
    assert len(res.created) == 1 and res.unrequested == (first.created[8499].id,)


async def test_a_large_model_stored_before_the_count_was_kept_is_rebuilt_whole(store: StateStore) -> None:
    (first,) = await store.converge_up([ScaleUp(model="m", replicas=8500, spec=SPEC, seq=1)], ACTIVE)
    assert len(first.created) == 8500
    await store.r.delete("gantry:model-active:m", "gantry:model-pending:m", "gantry:model-tracked")
    (res,) = await store.converge_up([ScaleUp(model="m", replicas=8501, spec=SPEC, seq=2)], ACTIVE)
    assert len(res.created) == 1 and len(res.unrequested) == 8500
    assert await store.r.scard("gantry:model-active:m") == 8501


@pytest.mark.parametrize("name", ['quote"d', "back\\slash", "tab\tbed", "../../etc/passwd", "x" * 64])
async def test_a_model_name_outside_the_grammar_is_refused_before_anything_is_written(
    store: StateStore, name: str
) -> None:
    with pytest.raises(InvalidRecord):
        await store.converge_up([ScaleUp(model=name, replicas=2, seq=1)], ACTIVE)
    assert await store.r.keys("*") == []


@pytest.mark.parametrize("replicas", [MAX_REPLICAS + 1, 10**9, 123456789012345678901234567890123456789, -2])
async def test_a_replica_count_outside_the_limit_is_refused_before_anything_is_written(
    store: StateStore, replicas: int
) -> None:
    with pytest.raises(InvalidRecord):
        await store.converge_up([ScaleUp(model="m", replicas=replicas, spec=SPEC, seq=1)], ACTIVE)
    assert await store.r.keys("*") == []


async def test_the_script_itself_refuses_a_count_past_the_limit_and_writes_nothing(store: StateStore) -> None:
    # Defence in depth: a caller that skips the Python check still cannot make the script loop.
    head, tail = _record_template("m", 0.0)
    args = ["PENDING", 2, CONVERGE_BUDGET, MAX_REPLICAS, "ok", 1, b"", 1, 0, "ok-1", "ok-1", head, tail, "",
            "m", 10**9, b"", 1, 0, "m-1", "m-1", head, tail, ""]
    keys = ["gantry:desired", "gantry:desired:seq", "gantry:models", "gantry:inst", "gantry:inst:state",
            "gantry:inst:reason", "gantry:desired:at", "gantry:lock:ok", "gantry:model:ok", "gantry:lock:m",
            "gantry:model:m"]
    with pytest.raises(redis.exceptions.ResponseError, match="replicas out of range"):
        await store._converge_up(keys=keys, args=args)
    assert await store.r.keys("*") == []


async def test_a_stored_count_past_the_limit_converges_to_the_limit_in_bounded_calls(store: StateStore) -> None:
    await store.r.hset("gantry:desired", "m", 10**12)  # written before the limit existed
    calls = 0
    real = store._converge_once

    async def counted(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    store._converge_once = counted  # type: ignore[method-assign]
    (res,) = await store.converge_up([ScaleUp(model="m")], ACTIVE)
    assert res.desired == MAX_REPLICAS and len(res.created) == MAX_REPLICAS
    assert calls == -(-MAX_REPLICAS // CONVERGE_BUDGET)
    assert (await store.desired())["m"] == MAX_REPLICAS


async def test_one_call_creates_at_most_its_budget_and_says_more_is_needed(store: StateStore) -> None:
    got = await store._converge_once([ScaleUp(model="m", replicas=CONVERGE_BUDGET + 7, spec=SPEC, seq=1)], ACTIVE)
    assert len(got[0].created) == CONVERGE_BUDGET and got[0].more
    (rest,) = await store.converge_up([ScaleUp(model="m")], ACTIVE)
    assert len(rest.created) == 7 and not rest.more


async def test_an_older_scale_command_does_not_undo_a_newer_one(store: StateStore) -> None:
    await store.converge_up([ScaleUp(model="m", replicas=4, spec=SPEC, seq=9)], ACTIVE)
    (res,) = await store.converge_up([ScaleUp(model="m", replicas=1, spec=SPEC, seq=3)], ACTIVE)
    assert not res.applied and res.desired == 4 and res.status == "ok"


async def test_scaling_down_is_left_to_the_locked_path(store: StateStore) -> None:
    await store.converge_up([ScaleUp(model="m", replicas=3, spec=SPEC, seq=1)], ACTIVE)
    (res,) = await store.converge_up([ScaleUp(model="m", replicas=1, spec=SPEC, seq=2)], ACTIVE)
    assert (res.status, res.applied, res.desired, res.created) == ("down", True, 1, ())
    assert len(await store.instances("m")) == 3


async def test_a_model_locked_by_another_reconciler_is_left_alone(store: StateStore) -> None:
    token = await store.lock_model("m")
    assert token
    (res,) = await store.converge_up([ScaleUp(model="m", replicas=2, spec=SPEC, seq=1)], ACTIVE)
    assert (res.status, res.applied, res.created) == ("busy", False, ())
    assert "m" not in await store.desired() and await store.instances("m") == []


async def test_models_of_one_call_are_converged_independently(store: StateStore) -> None:
    other = ModelSpec(name="llama-3.1-8b", weight_bytes=2 * GIB)
    got = await store.converge_up(
        [ScaleUp(model="m", replicas=1, spec=SPEC, seq=1), ScaleUp(model=other.name, replicas=2, spec=other, seq=2)],
        ACTIVE,
    )
    assert [(r.model, len(r.created)) for r in got] == [("m", 1), ("llama-3.1-8b", 2)]
    assert all(i.id.startswith("llama-3.1-8b-") for i in got[1].created)


async def test_concurrent_converges_never_create_more_than_desired(store: StateStore) -> None:
    await store.converge_up([ScaleUp(model="m", replicas=5, spec=SPEC, seq=1)], ACTIVE)
    # pretend nothing exists yet: five racing reconcilers
    await store.r.delete("gantry:model:m", "gantry:model-active:m", "gantry:model-pending:m")
    await store.r.delete("gantry:inst", "gantry:inst:state")
    await asyncio.gather(*(store.converge_up([ScaleUp(model="m")], ACTIVE) for _ in range(5)))
    assert len(await store.instances("m")) == 5


async def test_the_lock_holder_converges_and_a_lost_lock_writes_nothing(store: StateStore) -> None:
    token = await store.lock_model("m")
    assert token
    await store.r.hset("gantry:desired", "m", 2)
    (mine,) = await store.converge_up([ScaleUp(model="m", lock_token=token)], ACTIVE)
    assert mine.status == "ok" and len(mine.created) == 2
    await store.r.hset("gantry:desired", "m", 4)
    (lost,) = await store.converge_up([ScaleUp(model="m", lock_token="not-ours")], ACTIVE)
    assert lost.status == "busy" and len(await store.instances("m")) == 2


async def test_active_replicas_are_counted_whatever_their_state(store: StateStore) -> None:
    (first,) = await store.converge_up([ScaleUp(model="m", replicas=3, spec=SPEC, seq=1)], ACTIVE)
    a, b, c = (i.id for i in first.created)
    await running(store, a)
    token = await store.lock_model("m")
    assert token
    await store.mark_state("m", token, InstanceState.DRAINING, ACTIVE, [b])
    await store.unlock_model("m", token)
    await store.release([c], mode=InstanceState.UNREACHABLE.value)
    (res,) = await store.converge_up([ScaleUp(model="m")], ACTIVE)
    active = {s.value for s in ACTIVE}
    assert len(res.created) == 3 - sum(s in active for s in ("RUNNING", "DRAINING", "UNREACHABLE"))


async def test_state_stored_before_the_count_was_kept_is_counted_at_the_first_converge(store: StateStore) -> None:
    (first,) = await store.converge_up([ScaleUp(model="m", replicas=3, spec=SPEC, seq=1)], ACTIVE)
    a, b, _ = (i.id for i in first.created)
    await store.r.hset("gantry:inst:state", mapping={a: "RUNNING", b: "DRAINING"})  # written by an older version
    await store.r.delete("gantry:model-active:m", "gantry:model-pending:m", "gantry:model-tracked")
    (res,) = await store.converge_up([ScaleUp(model="m")], ACTIVE)
    assert len(res.created) == 1 and set(res.unrequested) == {first.created[2].id}
    (again,) = await store.converge_up([ScaleUp(model="m")], ACTIVE)
    assert again.created == ()


async def test_the_kept_count_follows_every_state_change(store: StateStore) -> None:
    # Each script that moves a state keeps the model's active set; it must always equal a count of the states.
    (first,) = await store.converge_up([ScaleUp(model="m", replicas=6, spec=SPEC, seq=1)], ACTIVE)
    ids = [i.id for i in first.created]
    await running(store, ids[0], ids[1], ids[2])
    await store.set_states([(ids[1], "w1", InstanceState.ERROR)])  # ERROR: still active
    token = await store.lock_model("m")
    assert token
    # ids[1] out of ERROR into DRAINING (the reconciler's move; a worker may not report DRAINING): no longer active
    await store.mark_state("m", token, InstanceState.DRAINING, ACTIVE, [ids[1], ids[2], ids[3]])
    await store.create_pending("m", token, [Instance(id="m-extra", model="m")])
    await store.unlock_model("m", token)
    await store.release([ids[4]])
    await store.release([ids[5]], mode=InstanceState.UNREACHABLE.value)
    states = {i.id: i.state for i in await store.instances("m")}
    counted = {i for i, s in states.items() if s in ACTIVE}
    assert {i.decode() for i in await store.r.smembers("gantry:model-active:m")} == counted == {ids[0], "m-extra"}
    (res,) = await store.converge_up([ScaleUp(model="m", replicas=3, spec=SPEC, seq=2)], ACTIVE)
    assert len(res.created) == 1 and res.unrequested == ("m-extra",)


async def running(store: StateStore, *ids: str) -> None:
    """Commit PENDING replicas onto worker w1 (one GPU each) and report them RUNNING."""
    w1 = Worker(name="w1", gpus=tuple(Gpu(index=i, vram_total=80 * GIB) for i in range(8)), ram_total=512 * GIB)
    await store.register_workers([w1])
    used = {g for i in ids if (inst := await store.instance(i)) is not None for g in inst.gpu_indexes}
    free = [g for g in range(8) if g not in used]
    items = [
        CommitItem(Instance(id=i, model="m", state=InstanceState.SCHEDULED, worker="w1", gpu_indexes=(g,),
                            vram_claims=(GIB,)))
        for i, g in zip(ids, free, strict=False)
    ]
    assert await store.commit(items) == ["ok"] * len(ids)
    await store.set_states([(i, "w1", InstanceState.RUNNING) for i in ids])


async def test_a_repeated_id_prefix_never_overwrites_a_replica(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shared.state.store as module

    monkeypatch.setattr(module.secrets, "token_hex", lambda n: "same")
    (first,) = await store.converge_up([ScaleUp(model="m", replicas=2, spec=SPEC, seq=1)], ACTIVE)
    await store.r.hset("gantry:inst:state", first.created[0].id, "RUNNING")
    (second,) = await store.converge_up([ScaleUp(model="m", replicas=4, spec=SPEC, seq=2)], ACTIVE)
    ids = [i.id for i in first.created + second.created]
    assert len(set(ids)) == 4
    assert (await store.instance(first.created[0].id)).state is InstanceState.RUNNING  # type: ignore[union-attr]


@pytest.mark.parametrize(("stored_seq", "stored_at", "seq", "at", "applied"), [
    (b"not a number", None, 1, 0, True),  # unreadable: the command is applied (as with nothing stored)
    (b"-5", None, 1, 0, True),
    (b"12", b"garbage", 7, 2_000_000, False),  # an unreadable time: the sequence alone decides
    (b"12", b"12:x", 7, 2_000_000, False),
    (b"12", b"11:1000000", 7, 2_000_000, False),  # a time of another sequence is not trusted
    (b"12", b"12:1000000", 7, 2_000_000, True),  # a later stream
    (b"12", b"12:1000000", 7, 1_000_000, False),  # the same stream, an older sequence
    (b"12", None, 12, 0, True),  # the applied one again
])
async def test_what_is_stored_of_the_last_command_decides_only_when_it_reads_whole(
    store: StateStore, stored_seq: bytes, stored_at: bytes | None, seq: int, at: int, applied: bool
) -> None:
    await store.r.hset(Keys.desired, "m", 3)
    await store.r.hset(Keys.desired_seq, "m", stored_seq)
    if stored_at is not None:
        await store.r.hset(Keys.desired_at, "m", stored_at)
    (res,) = await store.converge_up([ScaleUp(model="m", replicas=5, spec=SPEC, seq=seq, at=at / 1e6)], ACTIVE)
    assert res.applied is applied
    assert (await store.desired())["m"] == (5 if applied else 3)
