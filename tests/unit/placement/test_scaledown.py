"""Scale-down (spec §7): keep-scores per instance, lowest removed first, deterministic ties."""

from __future__ import annotations

import pytest

from shared.core.placement.domain import InstanceState, ModelSpec, PlacementStrategy
from shared.core.placement.pipeline import scale_down_order
from shared.core.placement.scaledown import SCALE_DOWN_SCORERS
from tests.unit.placement.helpers import NOW, ctx, instance, snapshot, worker

SPREAD = ModelSpec(name="m", placement_strategy=PlacementStrategy.SPREAD)
BINPACK = ModelSpec(name="m", placement_strategy=PlacementStrategy.BINPACK)


@pytest.mark.parametrize(
    ("worker_name", "state", "expected"),
    [
        ("ready", InstanceState.RUNNING, 100.0),
        ("ready", InstanceState.STARTING, 50.0),
        ("ready", InstanceState.SCHEDULED, 50.0),
        ("ready", InstanceState.ERROR, 0.0),
        ("stale", InstanceState.RUNNING, 0.0),
        ("cordoned", InstanceState.RUNNING, 0.0),
        (None, InstanceState.PENDING, 0.0),
    ],
)
def test_status_keep_score(worker_name, state, expected):
    snap = snapshot(worker("ready"), worker("stale", last_heartbeat=NOW - 100), worker("cordoned", cordoned=True))
    inst = instance("i", "m", worker_name or "", (0,), state=state)
    if worker_name is None:
        inst = inst.__class__(id="i", model="m", state=state)
    assert SCALE_DOWN_SCORERS["status"]().score(ctx(snap, SPREAD), [inst]) == [expected]


def test_offload_layers_keep_score_is_ten_times_the_offloaded_fraction():
    snap = snapshot(worker("w"))
    gguf = instance("g", "m", "w", (0,), total_layers=40, offload_layers=30)
    plain = instance("p", "m", "w", (1,))
    assert SCALE_DOWN_SCORERS["offload_layers"]().score(ctx(snap, SPREAD), [gguf, plain]) == [7.5, 0.0]


def test_binpack_keeps_the_fullest_bins():
    a, b = instance("a", "m", "w1", (0,), 72), instance("b", "m", "w2", (0,), 40)
    snap = snapshot(worker("w1"), worker("w2"), instances=(a, b))
    assert SCALE_DOWN_SCORERS["placement"]().score(ctx(snap, BINPACK), [a, b]) == [pytest.approx(0.9), 0.5]


def test_spread_trims_the_most_crowded_worker_first():
    insts = (instance("a", "m", "w1", (0,), 10), instance("b", "m", "w1", (1,), 10), instance("c", "m", "w2", (0,), 10))
    snap = snapshot(worker("w1"), worker("w2"), instances=insts)
    order = scale_down_order(snap, SPREAD, NOW)
    assert [e.instance_id for e in order][-1] == "c"
    assert order[0].breakdown["placement"] == pytest.approx(0.85 * 0.0 + 0.15 * 1.0)  # crowded worker, lone GPU


def test_unhealthy_instances_go_first_and_the_order_is_deterministic():
    insts = (
        instance("healthy", "m", "w1", (0,)),
        instance("starting", "m", "w2", (0,), state=InstanceState.STARTING),
        instance("on-dead-worker", "m", "dead", (0,)),
        instance("broken", "m", "w3", (0,), state=InstanceState.ERROR),
        instance("draining", "m", "w4", (0,), state=InstanceState.DRAINING),
    )
    snap = snapshot(worker("w1"), worker("w2"), worker("w3"), worker("w4"), worker("dead", last_heartbeat=0.0),
                    instances=insts)
    ids = [e.instance_id for e in scale_down_order(snap, SPREAD, NOW)]
    assert ids == ["broken", "on-dead-worker", "starting", "healthy"]  # draining ones are already leaving


def test_ties_remove_the_newest_instance_first():
    insts = (instance("old", "m", "w1", (0,), created_at=1.0), instance("new", "m", "w2", (0,), created_at=2.0))
    snap = snapshot(worker("w1"), worker("w2"), instances=insts)
    assert [e.instance_id for e in scale_down_order(snap, SPREAD, NOW)] == ["new", "old"]
