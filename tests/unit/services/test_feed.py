"""The snapshot feed applies worker reports to a service's in-memory snapshot."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.bus.messages import CordonEvent, Heartbeat, InstanceEvent, WorkerRegisteredEvent
from shared.core.placement.domain import (
    GIB,
    Gpu,
    GpuUsage,
    Instance,
    InstanceState,
    SubordinateWorker,
    Worker,
    WorkerState,
)
from shared.core.placement.snapshot import ClusterSnapshot, SnapshotConfig
from shared.host.feed import SnapshotFeed

W = Worker(name="w1", gpus=(Gpu(index=0, vram_total=80 * GIB),), ram_total=256 * GIB)


def stored(worker: Worker, revision: int) -> WorkerRegisteredEvent:
    return WorkerRegisteredEvent(worker=worker, revision=revision)


def feed() -> SnapshotFeed:
    f = SnapshotFeed(ClusterSnapshot(SnapshotConfig(heartbeat_interval=5.0, not_ready_after=15.0)))
    assert f.on_registered(stored(W, 1), now=0.0) is None
    return f


def beat(used_gib: int, seq: int) -> Heartbeat:
    return Heartbeat(worker="w1", seq=seq, gpus=(GpuUsage(index=0, vram_used=used_gib * GIB),))


def test_a_heartbeat_with_new_usage_changes_what_is_allocatable() -> None:
    f = feed()
    f.on_heartbeat(beat(10, 1), now=1.0)
    f.on_heartbeat(beat(30, 2), now=2.0)
    assert f.snapshot.gpu_allocatable("w1", 0) == 50 * GIB


def test_a_heartbeat_with_new_usage_keeps_a_cordon() -> None:
    f = feed()
    f.on_cordon(CordonEvent(worker="w1", cordoned=True))
    f.on_heartbeat(beat(10, 1), now=1.0)
    row = f.snapshot.row_of("w1")
    assert row is not None and f.snapshot.w_cordoned[row]
    assert f.snapshot.gpu_allocatable("w1", 0) == 70 * GIB


def test_a_heartbeat_with_the_same_usage_keeps_the_worker_alive() -> None:
    f = feed()
    f.on_heartbeat(beat(10, 1), now=1.0)
    f.on_heartbeat(beat(10, 2), now=14.0)
    assert f.snapshot.state("w1", now=20.0) is WorkerState.READY  # judged from the second heartbeat
    assert f.snapshot.gpu_allocatable("w1", 0) == 70 * GIB


def test_a_silent_worker_that_beats_again_is_a_cluster_change() -> None:
    f = feed()
    seen: list[str] = []
    f.listeners.append(seen.append)
    f.on_heartbeat(beat(10, 1), now=1.0)
    f.on_heartbeat(beat(10, 2), now=40.0)  # NOT_READY in between
    assert seen and "recovered" in seen[-1]
    assert f.snapshot.state("w1", now=41.0) is WorkerState.READY


def placed(state: InstanceState, **kw: object) -> InstanceEvent:
    inst = Instance(id="i1", model="m", state=state, worker="w1", gpu_indexes=(0,), vram_claims=(GIB,), **kw)  # type: ignore[arg-type]
    return InstanceEvent(instance=inst, at=1.0)


def test_instances_are_indexed_by_the_workers_they_occupy() -> None:
    f = feed()
    sub = SubordinateWorker(worker="w2", gpu_indexes=(0,), vram_claims=(GIB,))
    f.on_instance(placed(InstanceState.RUNNING, subordinates=(sub,)))
    assert f.on_worker == {"w1": {"i1"}, "w2": {"i1"}}
    assert f.running_on == {"w1": {"i1"}} and f.unreachable == set()


def test_an_unreachable_instance_leaves_its_worker_running_set() -> None:
    f = feed()
    f.on_instance(placed(InstanceState.RUNNING))
    f.on_instance(placed(InstanceState.UNREACHABLE))
    assert f.running_on == {} and f.unreachable == {"i1"} and f.on_worker == {"w1": {"i1"}}


def test_a_removed_instance_leaves_every_index() -> None:
    f = feed()
    f.on_instance(placed(InstanceState.UNREACHABLE))
    f.on_instance(InstanceEvent(instance=placed(InstanceState.UNREACHABLE).instance, removed=True, at=2.0))
    assert f.on_worker == {} and f.running_on == {} and f.unreachable == set()


def test_a_removed_worker_leaves_the_snapshot_and_may_join_again() -> None:
    f = feed()
    f.on_cordon(CordonEvent(worker="w1", cordoned=True, gpu_index=0))
    f.on_heartbeat(beat(10, 1), now=1.0)
    f.on_worker_removed("w1")
    assert f.snapshot.worker("w1") is None and f.snapshot.worker_names() == []
    assert "w1" not in f.inventory and "w1" not in f.last_seen and "w1" not in f.usage and not f.cordons
    joined: list[str] = []
    f.listeners.append(joined.append)
    assert f.on_registered(stored(W, 2), now=5.0) is None
    assert joined == ["worker w1 joined"]


def test_removing_an_unknown_worker_is_harmless() -> None:
    f = feed()
    f.on_worker_removed("nowhere")
    assert f.snapshot.worker_names() == ["w1"]


@pytest.mark.parametrize(
    ("after", "changed"),
    [
        (W, False),
        (msgspec.structs.replace(W, gpus=(*W.gpus, Gpu(index=1, vram_total=80 * GIB))), True),
        (msgspec.structs.replace(W, gpus=(Gpu(index=0, vram_total=96 * GIB),)), True),
        (msgspec.structs.replace(W, ram_total=512 * GIB), True),
        (msgspec.structs.replace(W, gpus=(Gpu(index=0, vram_total=40 * GIB),)), False),
    ],
    ids=["same", "gpu-added", "gpu-larger", "more-ram", "shrank"],
)
def test_a_reregistration_that_grows_the_inventory_is_a_cluster_change(after: Worker, changed: bool) -> None:
    f = feed()
    seen: list[str] = []
    f.listeners.append(seen.append)
    assert f.on_registered(stored(after, 2), now=1.0) is None
    assert seen == (["inventory of w1 grew"] if changed else [])


def test_an_uncordon_is_a_cluster_change_and_a_cordon_is_not() -> None:
    f = feed()
    seen: list[str] = []
    f.listeners.append(seen.append)
    f.on_cordon(CordonEvent(worker="w1", cordoned=True, gpu_index=0))
    assert seen == []
    f.on_cordon(CordonEvent(worker="w1", cordoned=False, gpu_index=0))
    assert seen == ["w1:0 uncordoned"]


@pytest.mark.parametrize(
    ("state", "removed", "changed"),
    [
        (InstanceState.RUNNING, True, True),
        (InstanceState.UNREACHABLE, False, True),
        (InstanceState.DRAINING, False, False),
        (InstanceState.ERROR, False, False),
    ],
    ids=["removed", "released-unreachable", "draining-still-holds", "error-still-holds"],
)
def test_claims_released_are_a_cluster_change(state: InstanceState, removed: bool, changed: bool) -> None:
    f = feed()
    placed = Instance(id="a", model="m", state=InstanceState.RUNNING, worker="w1", gpu_indexes=(0,),
                      vram_claims=(GIB,))
    f.on_instance(InstanceEvent(instance=placed, at=1.0))
    seen: list[str] = []
    f.listeners.append(seen.append)
    f.on_instance(InstanceEvent(instance=msgspec.structs.replace(placed, state=state), removed=removed, at=2.0))
    assert seen == (["resources freed by a"] if changed else [])


TWO = msgspec.structs.replace(W, gpus=(*W.gpus, Gpu(index=1, vram_total=80 * GIB)))


def test_an_announcement_older_than_the_inventory_held_is_ignored() -> None:
    f = feed()
    assert f.on_registered(stored(TWO, 3), now=1.0) is None
    assert f.on_registered(stored(W, 2), now=2.0) is None  # a slower writer replica's older store
    assert [g.index for g in f.inventory["w1"].gpus] == [0, 1]
    assert f.snapshot.gpu_allocatable("w1", 1) == 80 * GIB


def test_a_duplicate_announcement_changes_nothing() -> None:
    f = feed()
    seen: list[str] = []
    f.listeners.append(seen.append)
    assert f.on_registered(stored(TWO, 2), now=1.0) is None
    assert f.on_registered(stored(TWO, 2), now=9.0) is None
    assert seen == ["inventory of w1 grew"] and f.last_seen["w1"] == 1.0


def test_a_worker_that_left_is_not_brought_back_by_a_late_announcement() -> None:
    f = feed()
    f.on_worker_removed("w1")
    assert f.on_registered(stored(W, 1), now=2.0) is None
    assert f.snapshot.worker("w1") is None
    assert f.on_registered(stored(W, 5), now=3.0) is None  # a new store: it registered again
    assert f.snapshot.worker("w1") is not None


def test_an_inventory_that_drops_a_gpu_drops_it_from_the_snapshot() -> None:
    f = feed()
    f.on_registered(stored(TWO, 2), now=1.0)
    f.on_registered(stored(W, 3), now=2.0)
    worker = f.snapshot.worker("w1")
    assert worker is not None and [g.index for g in worker.gpus] == [0]


@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["i1", "i2"]),
            st.sampled_from(list(InstanceState)),
            st.sampled_from([None, "w1", "w2"]),
            st.booleans(),  # with a subordinate on w3
            st.booleans(),  # removed
        ),
        max_size=12,
    )
)
def test_the_instance_indexes_always_equal_a_rebuild_from_the_instances(
    steps: list[tuple[str, InstanceState, str | None, bool, bool]],
) -> None:
    f = feed()
    for t, (iid, state, worker, sub, removed) in enumerate(steps):
        subs = (SubordinateWorker(worker="w3", gpu_indexes=(0,), vram_claims=(GIB,)),) if sub and worker else ()
        inst = Instance(id=iid, model="m", state=state, worker=worker, gpu_indexes=(0,) if worker else (),
                        vram_claims=(GIB,) if worker else (), subordinates=subs)
        f.on_instance(InstanceEvent(instance=inst, removed=removed, at=float(t)))
    rebuilt = SnapshotFeed(f.snapshot)
    for inst in f.instances.values():
        rebuilt._index(inst, add=True)
    assert (f.on_worker, f.running_on, f.unreachable) == (rebuilt.on_worker, rebuilt.running_on, rebuilt.unreachable)


def test_an_unchanged_reregistration_only_moves_liveness_and_keeps_the_snapshot_memos() -> None:
    f = feed()
    f.on_heartbeat(beat(10, 1), now=1.0)
    f.snapshot.memo["kept"] = True
    version = f.snapshot.version
    assert f.on_registered(stored(W, 2), now=14.0) is None
    assert f.snapshot.memo == {"kept": True}  # no row rebuild
    assert f.snapshot.state("w1", now=20.0) is WorkerState.READY  # judged from the re-registration
    assert f.snapshot.gpu_allocatable("w1", 0) == 70 * GIB  # the heartbeat's usage still applies
    assert f.snapshot.version > version and f.revisions["w1"] == 2
    assert f.on_registered(stored(TWO, 3), now=15.0) is None  # a changed inventory rebuilds the row
    assert "kept" not in f.snapshot.memo and f.snapshot.gpu_allocatable("w1", 1) == 80 * GIB


def three_workers() -> SnapshotFeed:
    f = SnapshotFeed(ClusterSnapshot(SnapshotConfig(heartbeat_interval=5.0, not_ready_after=15.0)))
    for rev, name in enumerate(("w1", "w2", "w3"), start=1):
        gpus = (Gpu(index=0, vram_total=80 * GIB), Gpu(index=1, vram_total=80 * GIB))
        assert f.on_registered(stored(Worker(name=name, gpus=gpus, ram_total=256 * GIB), rev), now=0.0) is None
    return f


def snapshot_columns(snap: ClusterSnapshot) -> dict[str, object]:
    import numpy as np

    return {k: v.tolist() for k, v in vars(snap).items() if isinstance(v, np.ndarray)} | {"version": snap.version}


@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["i1", "i2", "i3"]),
            st.sampled_from(list(InstanceState)),
            st.sampled_from([None, "w1", "w2"]),
            st.sampled_from([0, 1]),  # GPU
            st.booleans(),  # with a subordinate on w3
            st.booleans(),  # removed
        ),
        max_size=16,
    ),
    cut=st.integers(min_value=0, max_value=16),
)
def test_instance_changes_applied_as_a_batch_leave_the_snapshot_as_one_by_one(
    steps: list[tuple[str, InstanceState, str | None, int, bool, bool]], cut: int
) -> None:
    events = []
    for t, (iid, state, worker, gpu, sub, removed) in enumerate(steps):
        subs = (SubordinateWorker(worker="w3", gpu_indexes=(1,), vram_claims=(2 * GIB,)),) if sub and worker else ()
        inst = Instance(id=iid, model="m", state=state, worker=worker, gpu_indexes=(gpu,) if worker else (),
                        vram_claims=(GIB * (t + 1),) if worker else (), subordinates=subs, created_at=float(t))
        events.append(InstanceEvent(instance=inst, removed=removed, at=float(t)))
    one_by_one, batched = three_workers(), three_workers()
    for ev in events:
        one_by_one.on_instance(ev)
    batched.on_instances(events[:cut])  # two batches: the second starts from the first's refreshed rows
    batched.on_instances(events[cut:])
    assert snapshot_columns(batched.snapshot) == snapshot_columns(one_by_one.snapshot)
    assert batched.snapshot.instances() == one_by_one.snapshot.instances()


def test_a_heartbeat_is_checked_again_against_a_new_inventory() -> None:
    f = feed()
    two = Heartbeat(worker="w1", seq=1, gpus=(GpuUsage(index=0, vram_used=GIB), GpuUsage(index=1, vram_used=GIB)))
    assert f.on_registered(stored(TWO, 2), now=0.5) is None
    assert f.on_heartbeat(two, now=1.0) is None
    assert f.on_registered(stored(W, 3), now=1.5) is None  # GPU 1 left the inventory
    assert f.on_heartbeat(msgspec.structs.replace(two, seq=2), now=2.0) is not None
    f.on_worker_removed("w1")
    assert f.on_heartbeat(msgspec.structs.replace(two, seq=3), now=3.0) is not None
