"""The one-call scale-up converge: scale commands recorded in order, missing replicas created atomically."""

from __future__ import annotations

import asyncio

import pytest

from shared.core.placement.domain import GIB, InstanceState, ModelSpec
from shared.core.placement.reconcile import ACTIVE
from shared.state import StateStore
from shared.state.store import ScaleUp

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


@pytest.mark.parametrize("name", ['quote"d', "back\\slash", "tab\tbed"])
async def test_replicas_of_a_model_whose_name_needs_json_escaping_read_back_whole(store: StateStore, name: str) -> None:
    spec = ModelSpec(name=name, weight_bytes=2 * GIB)
    (res,) = await store.converge_up([ScaleUp(model=name, replicas=2, spec=spec, seq=1)], ACTIVE)
    stored = await store.instances(name)
    assert sorted(i.id for i in stored) == sorted(i.id for i in res.created)
    assert all(i.model == name and i.id.startswith(f"{name}-") for i in stored)


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
    await store.r.delete("gantry:model:m")  # pretend nothing exists yet: five racing reconcilers
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
    await store.r.hset("gantry:inst:state", mapping={a: "RUNNING", b: "DRAINING", c: "UNREACHABLE"})
    (res,) = await store.converge_up([ScaleUp(model="m")], ACTIVE)
    active = {s.value for s in ACTIVE}
    assert len(res.created) == 3 - sum(s in active for s in ("RUNNING", "DRAINING", "UNREACHABLE"))


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
