"""During a rolling upgrade a reconciler of the previous release (its converge script as of 5a2bb79, kept in
``previous/``) runs beside one of this release on the same Redis. The old script reads ``gantry:desired:seq`` with
``tonumber`` and compares it: it must not fail on what the new one stored (every scale command of its model would
be redelivered until given up), and what it stores must not make the new one trust a time that goes with another
sequence."""

from __future__ import annotations

import secrets
from pathlib import Path

import msgspec
import pytest
import redis.exceptions

from shared.core.limits import MAX_REPLICAS
from shared.core.placement.domain import GIB, ModelSpec
from shared.core.placement.reconcile import ACTIVE
from shared.state import StateStore
from shared.state.replay import call_key, prelude
from shared.state.store import CONVERGE_BUDGET, Keys, ScaleUp, _record_template, _tracking_lib

SPEC = ModelSpec(name="m", weight_bytes=2 * GIB)


def previous_script() -> str:
    """converge_up.lua as the previous release shipped it (kept beside this test: a checkout may have no history)."""
    return (Path(__file__).parent / "previous" / "converge_up.lua").read_text()


async def old_scale(store: StateStore, model: str, replicas: int, seq: int) -> list[object]:
    """One scale command through the previous release's script and argument layout (9 per model, no time)."""
    script = store.r.register_script(prelude() + _tracking_lib() + previous_script())
    head, tail = _record_template(model, 0.0)
    prefix = f"{model}-{secrets.token_hex(4)}"
    args: list[object] = [",".join(s.value for s in ACTIVE), 1, CONVERGE_BUDGET, MAX_REPLICAS, model, replicas,
                          msgspec.json.encode(SPEC), seq, prefix, prefix, head, tail, ""]
    keys = [Keys.desired, Keys.desired_seq, Keys.models, Keys.inst, Keys.inst_state, Keys.inst_reason,
            Keys.lock + model, Keys.model_index + model, call_key(Keys.replay)]
    out: list[object] = msgspec.json.decode(await script(keys=keys, args=args))
    return out


async def test_the_previous_releases_script_reads_a_value_this_release_stored(store: StateStore) -> None:
    await store.converge_up([ScaleUp(model="m", replicas=2, spec=SPEC, seq=10, at=1_700_000_000.0)], ACTIVE)
    assert await store.r.hget(Keys.desired_seq, "m") in (b"10", b"10:1700000000000000")
    try:
        await old_scale(store, "m", 3, seq=11)  # the old replica's next command
    except redis.exceptions.ResponseError as err:
        pytest.fail(f"the previous release's converge fails on the new stored format: {err}")
    assert (await store.desired())["m"] == 3


async def test_a_time_stored_with_an_older_sequence_is_not_trusted_after_the_previous_release_applied_one(
    store: StateStore,
) -> None:
    t10 = 1_700_000_000.0
    await store.converge_up([ScaleUp(model="m", replicas=2, spec=SPEC, seq=10, at=t10)], ACTIVE)
    await old_scale(store, "m", 3, seq=12)  # the old replica applies seq 12 (stored at t10 + 2 s): no time kept
    # seq 11 (stored at t10 + 1 s, before seq 12) redelivered to the new replica: older than what was applied
    (res,) = await store.converge_up([ScaleUp(model="m", replicas=7, spec=SPEC, seq=11, at=t10 + 1)], ACTIVE)
    assert not res.applied and (await store.desired())["m"] == 3
