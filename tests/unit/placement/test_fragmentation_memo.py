"""The fragmentation scorer's kept state (issue 19): whatever events the snapshot takes between decisions, the
fast path that reuses fragments and window counts decides exactly as the reference path that recomputes all."""

from __future__ import annotations

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from shared.core.placement.domain import (
    GIB,
    Decision,
    Instance,
    InstanceState,
    ModelSpec,
    PlacementStrategy,
    Worker,
)
from shared.core.placement.lifecycle import instance_from_decision
from shared.core.placement.pipeline import place
from shared.core.placement.profile import DEFAULT_PROFILE, Profile, ScorerConfig
from shared.core.placement.scorers.fragmentation_cache import rows_any
from shared.core.placement.snapshot import ClusterSnapshot
from tests.unit.placement.test_properties import NOW, SETTINGS, build, clusters, models

# The default profile (the ``placement`` scorer dispatching to fragmentation), and the scorer alone with a
# window of three placements, so that the learned workload slides within a short test.
PROFILES = (DEFAULT_PROFILE, Profile(scorers=(ScorerConfig(name="fragmentation", args={"window": 3}),)))
EVENTS = ("keep", "remove", "usage", "touch", "inventory", "remove-worker", "reclaim", "readd", "place-and-undo")


def _auto(model: ModelSpec) -> ModelSpec:
    return msgspec.structs.replace(model, placement_strategy=PlacementStrategy.AUTO)


def _decide_both_ways(snap: ClusterSnapshot, model: ModelSpec, profile: Profile) -> Decision | None:
    fast = place(snap, model, NOW, profile)
    reference = place(snap, model, NOW, profile, exhaustive=True)
    assert fast == reference
    return fast if isinstance(fast, Decision) else None


def _apply(snap: ClusterSnapshot, event: str, pick: int, decision: Decision | None, serial: int) -> None:
    """One snapshot event; ``pick`` chooses the worker or instance it touches."""
    workers = [w for name in snap.worker_names() if (w := snap.worker(name)) is not None]
    instances = [i for i in snap.instances() if i.worker is not None]
    if event == "keep" and decision is not None:
        snap.upsert_instance(instance_from_decision(decision, f"kept-{serial}", created_at=float(serial)))
    elif event == "place-and-undo" and decision is not None:  # what the core benchmark does between decisions
        snap.upsert_instance(instance_from_decision(decision, "undo", created_at=float(serial)))
        snap.remove_instance("undo")
    elif event == "remove" and instances:
        snap.remove_instance(instances[pick % len(instances)].id)
    elif event in ("reclaim", "readd") and instances:
        old = instances[pick % len(instances)]
        claims = tuple(c // 2 + GIB for c in old.vram_claims)
        if event == "readd":  # gone and back under the same id and creation time, with other claims
            snap.remove_instance(old.id)
        snap.upsert_instance(msgspec.structs.replace(old, vram_claims=claims, cpu_claim=old.cpu_claim + 1000))
    elif event in ("usage", "touch", "inventory", "remove-worker") and workers:
        worker = workers[pick % len(workers)]
        if event == "touch":
            snap.touch(worker.name, worker.last_heartbeat)
        elif event == "usage":
            gpus = tuple(msgspec.structs.replace(g, vram_used=(g.vram_used + (pick % 3) * 7 * GIB) % g.vram_total)
                         for g in worker.gpus)
            snap.update_usage(msgspec.structs.replace(worker, gpus=gpus, cpu_used=(pick % 4) * 2000,
                                                      ram_used=(pick % 5) * 4 * GIB))
        elif event == "inventory":
            gpus = tuple(msgspec.structs.replace(g, schedulable=not g.schedulable) if g.index == pick % 4 else g
                         for g in worker.gpus)
            snap.upsert_worker(msgspec.structs.replace(worker, gpus=gpus))
        else:
            snap.remove_worker(worker.name)


@SETTINGS
@given(clusters(), models(), st.sampled_from(PROFILES),
       st.lists(st.tuples(st.sampled_from(EVENTS), st.integers(0, 1000)), min_size=1, max_size=10))
def test_kept_fragments_decide_as_the_reference_after_any_event_sequence(parts, model, profile, events):
    snap = build(parts)
    model = _auto(model)
    for serial, (event, pick) in enumerate(events):
        decision = _decide_both_ways(snap, model, profile)
        _apply(snap, event, pick, decision, serial)
    _decide_both_ways(snap, model, profile)


@SETTINGS
@given(clusters(), st.lists(models(), min_size=2, max_size=4))
def test_kept_fragments_serve_several_models_in_turn(parts, many):
    """Requests of other sizes and host claims share one snapshot's memos (one per host claim and GPU count)."""
    snap = build(parts)
    for serial, model in enumerate(many * 2):
        decision = _decide_both_ways(snap, _auto(model), DEFAULT_PROFILE)
        if decision is not None:
            snap.upsert_instance(instance_from_decision(decision, f"n{serial}", created_at=float(serial)))


def test_an_instance_replaced_with_other_claims_gets_a_new_window_key():
    snap = ClusterSnapshot.from_parts(instances=[
        Instance(id="a", model="m", state=InstanceState.RUNNING, worker="w", gpu_indexes=(0,), vram_claims=(GIB,))])
    before = list(snap.placed_window(10))
    inst = snap.instance("a")
    assert inst is not None
    snap.upsert_instance(msgspec.structs.replace(inst, state=InstanceState.STARTING))  # same claims: same key
    assert snap.placed_window(10) == before
    snap.upsert_instance(msgspec.structs.replace(inst, vram_claims=(2 * GIB,)))
    assert snap.placed_window(10) != before
    assert [key[1] for key in snap.placed_window(10)] == ["a"]


def test_a_row_stamp_moves_with_the_rows_usage_and_not_with_a_bare_heartbeat():
    snap = ClusterSnapshot.from_parts(workers=[Worker(name="w", ram_total=GIB, last_heartbeat=1.0)])
    row = snap.row_of("w")
    assert row is not None
    stamp = int(snap.w_stamp[row])
    snap.touch("w", 2.0)
    assert int(snap.w_stamp[row]) == stamp
    worker = snap.worker("w")
    assert worker is not None
    snap.update_usage(msgspec.structs.replace(worker, ram_used=GIB // 2))
    assert int(snap.w_stamp[row]) > stamp


def test_rows_any_equals_numpys_per_row_any_for_every_width():
    import numpy as np

    rng = np.random.default_rng(3)
    for width in (1, 2, 3, 4, 8, 9, 16):
        mask = rng.random((50, width)) < 0.1
        assert np.array_equal(rows_any(mask), mask.any(axis=1))
        assert np.array_equal(rows_any(mask[:, ::-1]), mask[:, ::-1].any(axis=1))  # not contiguous


@given(st.lists(st.integers(0, 40), unique=True), st.lists(st.integers(0, 40), unique=True))
def test_window_change_lists_exactly_the_keys_that_left_and_came(old, new):
    from shared.core.placement.scorers.fragmentation_cache import window_change

    def keys(xs: list[int]) -> list[tuple[float, str, int]]:
        return sorted((float(x), f"i{x}", x) for x in xs)

    left, came = window_change(keys(old), keys(new))
    assert sorted(left) == keys(sorted(set(old) - set(new)))
    assert sorted(came) == keys(sorted(set(new) - set(old)))


def test_window_change_of_a_slid_window_is_its_ends():
    from shared.core.placement.scorers.fragmentation_cache import window_change

    old = [(float(k), f"i{k}", k) for k in range(10)]
    assert window_change(old, [*old[2:], (11.0, "i11", 11)]) == (old[:2], [(11.0, "i11", 11)])
