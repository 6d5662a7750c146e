"""The snapshot derives allocatable resources, liveness and counts, and follows events incrementally."""

from __future__ import annotations

import pytest

from shared.core.limits import MAX_FILES_PER_WORKER
from shared.core.placement.domain import GIB, InstanceState, ModelFile, ModelFileState, SubordinateWorker, WorkerState
from shared.core.placement.snapshot import ClusterSnapshot, SnapshotConfig
from tests.unit.placement.helpers import NOW, gpu, instance, snapshot, worker


@pytest.mark.parametrize(
    ("used", "claims", "reserve", "expected"),
    [
        (0, 0, 0, 80),  # empty GPU
        (0, 72, 0, 8),  # Gantry claim only (not started yet: nothing reported)
        (72, 72, 0, 8),  # claim fully reported as used: no external use
        (30, 0, 0, 50),  # 30 GiB used by processes Gantry does not manage
        (50, 20, 0, 30),  # 20 claimed + 30 external
        (10, 20, 0, 60),  # reported below claims: external use never negative
        (0, 0, 2, 78),  # reserve
        (50, 20, 2, 28),
    ],
)
def test_gpu_allocatable_is_total_minus_claims_minus_external_minus_reserve(used, claims, reserve, expected):
    snap = snapshot(
        worker("w1", [gpu(0, used=used)]),
        instances=(instance("i", "m", "w1", (0,), claim=claims),) if claims else (),
        config=SnapshotConfig(vram_reserve=reserve * GIB),
    )
    assert snap.gpu_allocatable("w1", 0) == expected * GIB


def test_ram_allocatable_counts_external_use_and_reserve():
    snap = snapshot(worker("w1", 0, ram=64, ram_used=20), config=SnapshotConfig(ram_reserve=4 * GIB))
    assert snap.ram_allocatable("w1") == 40 * GIB
    snap.upsert_instance(instance("i", "m", "w1", (), ram_claim=30 * GIB))
    assert snap.ram_allocatable("w1") == 30 * GIB  # 64 - max(30 claimed, 20 used) - 4


@pytest.mark.parametrize(
    ("age", "cordoned", "expected"),
    [(0.0, False, WorkerState.READY), (14.9, False, WorkerState.READY), (15.0, False, WorkerState.NOT_READY),
     (100.0, False, WorkerState.NOT_READY), (0.0, True, WorkerState.MAINTENANCE)],
)
def test_liveness_is_judged_from_heartbeat_age_at_the_callers_now(age, cordoned, expected):
    snap = snapshot(worker("w1", last_heartbeat=NOW - age, cordoned=cordoned))
    assert snap.state("w1", NOW) == expected


def test_instance_updates_and_removal_release_claims_and_counts():
    snap = snapshot(worker("w1", 2))
    snap.upsert_instance(instance("i1", "a", "w1", (0,), claim=40))
    assert snap.gpu_allocatable("w1", 0) == 40 * GIB
    assert snap.worker_counts("a", "w1") == (1, 0)
    assert snap.worker_counts("b", "w1") == (0, 1)
    snap.upsert_instance(instance("i1", "a", "w1", (1,), claim=10, state=InstanceState.STARTING))  # moved
    assert snap.gpu_allocatable("w1", 0) == 80 * GIB
    assert snap.gpu_allocatable("w1", 1) == 70 * GIB
    assert snap.gpu_counts("a", "w1", 1) == (1, 0)
    snap.remove_instance("i1")
    assert snap.gpu_allocatable("w1", 1) == 80 * GIB
    assert snap.worker_counts("a", "w1") == (0, 0)
    assert snap.instances() == []


def test_a_state_change_keeps_claims_and_counts_and_records_the_state():
    snap = snapshot(worker("w1", 2))
    snap.upsert_instance(instance("i1", "a", "w1", (0,), claim=40, state=InstanceState.SCHEDULED))
    snap.upsert_instance(instance("i1", "a", "w1", (0,), claim=40, state=InstanceState.RUNNING))
    assert snap.gpu_allocatable("w1", 0) == 40 * GIB
    assert snap.worker_counts("a", "w1") == (1, 0) and snap.gpu_counts("a", "w1", 0) == (1, 0)
    assert [i.state for i in snap.instances()] == [InstanceState.RUNNING]


def test_instance_arriving_before_its_worker_is_applied_when_the_worker_joins():
    snap = ClusterSnapshot()
    snap.upsert_instance(instance("i1", "a", "w1", (1,), claim=50))
    snap.upsert_worker(worker("w1", 2))
    assert snap.gpu_allocatable("w1", 1) == 30 * GIB


def test_heartbeat_replaces_reported_usage_and_keeps_claims():
    snap = snapshot(worker("w1", 1), instances=(instance("i1", "a", "w1", (0,), claim=20),))
    snap.upsert_worker(worker("w1", [gpu(0, used=60)]))
    assert snap.gpu_allocatable("w1", 0) == 20 * GIB


def test_subordinate_workers_hold_claims_and_count_as_hosting_the_model():
    snap = snapshot(worker("w1", 1), worker("w2", 1))
    sub = SubordinateWorker(worker="w2", gpu_indexes=(0,), vram_claims=(70 * GIB,))
    snap.upsert_instance(instance("i1", "a", "w1", (0,), claim=70, subordinates=(sub,)))
    assert snap.gpu_allocatable("w2", 0) == 10 * GIB
    assert snap.worker_counts("a", "w2") == (1, 0)


def test_removed_worker_rows_are_reused_and_columns_grow():
    snap = ClusterSnapshot()
    for i in range(40):
        snap.upsert_worker(worker(f"w{i:02d}", 2))
    snap.remove_worker("w05")
    assert snap.worker("w05") is None
    snap.upsert_worker(worker("big", 12))
    assert snap.gpu_allocatable("big", 11) == 80 * GIB
    assert snap.rows == 40
    assert len(snap) == 40


def test_remembered_row_lookups_follow_workers_leaving_and_joining():
    snap = snapshot(worker("a"), worker("b"))
    names = ("a", "b", "c")
    assert snap.rows_of(names).tolist() == [0, 1, -1]
    layout = snap.layout
    snap.upsert_worker(worker("a"))  # a heartbeat: nothing moves
    assert snap.layout == layout
    snap.remove_worker("a")
    snap.upsert_worker(worker("c"))  # takes a's row
    assert snap.layout > layout
    assert snap.rows_of(names).tolist() == [-1, 1, 0]
    assert snap.names_of(snap.rows_of(("b", "c"))) == ["b", "c"]


def test_sorted_names_of_a_row_mask_follow_renames():
    snap = snapshot(worker("m"), worker("a"), worker("z"))
    mask = snap.w_present[: snap.rows].copy()
    assert snap.names_where(mask) == ["a", "m", "z"]
    snap.remove_worker("a")
    snap.upsert_worker(worker("y"))
    assert snap.names_where(snap.w_present[: snap.rows].copy()) == ["m", "y", "z"]


def test_a_worker_reporting_files_of_ever_new_sources_is_held_to_the_limit():
    snap = snapshot(worker("w1"), worker("w2"))
    ready = ModelFileState.READY
    for n in range(MAX_FILES_PER_WORKER):
        assert snap.set_model_file(ModelFile(source=f"s{n}", worker="w1", state=ready))
    assert not snap.set_model_file(ModelFile(source="one-more", worker="w1", state=ready))
    assert not snap.model_file_ready("one-more", "w1") and len(snap.model_files()) == MAX_FILES_PER_WORKER
    assert snap.set_model_file(ModelFile(source="s0", worker="w1", state=ModelFileState.ERROR))  # known: updated
    assert snap.set_model_file(ModelFile(source="one-more", worker="w2", state=ready))  # another worker's own count
    snap.remove_model_file("s0", "w1")
    assert snap.set_model_file(ModelFile(source="one-more", worker="w1", state=ready))  # room again


def test_model_file_readiness_is_recorded_per_source_and_worker():
    snap = snapshot(worker("w1"), worker("w2"))
    snap.set_model_file(ModelFile(source="s", worker="w1", state=ModelFileState.READY))
    snap.set_model_file(ModelFile(source="s", worker="w2", state=ModelFileState.DOWNLOADING, progress=0.5))
    assert snap.model_file_ready("s", "w1") and not snap.model_file_ready("s", "w2")
    assert snap.ready_file_rows("s").tolist() == [True, False]
    snap.set_model_file(ModelFile(source="s", worker="w2", state=ModelFileState.READY))
    assert snap.ready_file_rows("s").tolist() == [True, True]
    snap.remove_model_file("s", "w1")
    assert not snap.model_file_ready("s", "w1")
    assert snap.ready_file_rows("s").tolist() == [False, True]
    snap.upsert_worker(worker("w3"))
    assert snap.ready_file_rows("s").tolist() == [False, True, False]


def test_per_model_count_columns_stay_equal_to_a_rebuild_through_events():
    snap = snapshot(worker("w1", 2), worker("w2", 2))
    before = snap.model_count_columns("m")  # cached from here on, then updated in place
    assert before[0].sum() == 0
    snap.upsert_instance(instance("a", "m", "w1", (0, 1), claim=10))
    snap.upsert_instance(instance("b", "m", "w2", (1,), claim=10))
    snap.upsert_instance(instance("b", "m", "w1", (1,), claim=10))  # moved
    snap.upsert_instance(instance("c", "x", "w2", (0,), claim=10))
    snap.remove_instance("a")
    snap.upsert_worker(worker("w2", 2))  # heartbeat: same GPUs, cache kept
    for cached, rebuilt in zip(snap.model_count_columns("m"), snap._build_counts("m"), strict=True):
        assert (cached == rebuilt).all()
    snap.upsert_worker(worker("w3", 4))  # new row and wider GPU columns: rebuilt on demand
    snap.upsert_instance(instance("d", "m", "w3", (3,), claim=10))
    per_worker, per_gpu = snap.model_count_columns("m")
    assert per_worker[snap.row_of("w3")] == 1 and per_gpu[snap.row_of("w3"), 3] == 1
    assert per_worker[snap.row_of("w1")] == 1 and per_gpu[snap.row_of("w1"), 1] == 1


COLUMNS = ("w_heartbeat", "w_ram_alloc", "w_instances", "w_vram_free", "g_alloc", "g_instances", "g_total", "g_ok")


def test_a_usage_only_update_leaves_the_columns_a_full_upsert_would():
    before = worker("w1", [gpu(0), gpu(1)], ram_used=10)
    after = worker("w1", [gpu(0, used=40), gpu(1, used=5)], ram_used=30, last_heartbeat=NOW + 5)
    held = (instance("i", "m", "w1", (0,), claim=20),)
    partial, full = snapshot(before, instances=held), snapshot(before, instances=held)
    partial.update_usage(after)
    full.upsert_worker(after)
    for column in COLUMNS:
        assert (getattr(partial, column) == getattr(full, column)).all(), column
    assert partial.gpu_allocatable("w1", 0) == 40 * GIB and partial.worker("w1") == after


def test_a_usage_update_for_an_unknown_worker_adds_it_whole():
    snap = snapshot(worker("w1"))
    snap.update_usage(worker("w2", [gpu(0, used=10)]))
    assert snap.gpu_allocatable("w2", 0) == 70 * GIB and snap.state("w2", NOW) is WorkerState.READY
