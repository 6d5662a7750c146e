"""The columnar fitting → scoring hop decides exactly what the core's candidate path decides."""

from __future__ import annotations

import numpy as np
import pytest

from shared.bus.columns import CandidateSet, as_candidates, fit_columns, locate, score_columns
from shared.core.placement import ClusterSnapshot, requirements, run_fitting, run_scoring
from shared.core.placement.domain import (
    GIB,
    Category,
    Gpu,
    Instance,
    InstanceState,
    ModelSpec,
    PlacementStrategy,
    ResourceRequest,
    Worker,
)


def cluster() -> ClusterSnapshot:
    workers = [
        Worker(
            name=f"w{i}",
            gpus=tuple(Gpu(index=g, vram_total=(24 if i % 3 == 0 else 80) * GIB) for g in range(4)),
            ram_total=256 * GIB,
            last_heartbeat=100.0,
        )
        for i in range(12)
    ]
    snap = ClusterSnapshot.from_parts(workers=workers)
    for n, (w, g, gib) in enumerate([("w1", 0, 60), ("w1", 1, 30), ("w4", 2, 75), ("w7", 3, 10)]):
        snap.upsert_instance(
            Instance(id=f"x{n}", model="other", state=InstanceState.RUNNING, worker=w, gpu_indexes=(g,),
                     vram_claims=(gib * GIB,))
        )
    return snap


MODELS = [
    ModelSpec(name="emb", weight_bytes=6 * GIB, categories=(Category.EMBEDDING,)),
    ModelSpec(name="emb-bp", weight_bytes=6 * GIB, categories=(Category.EMBEDDING,),
              placement_strategy=PlacementStrategy.BINPACK),
    ModelSpec(name="llm", weight_bytes=14 * GIB),
]


def request_of(model: ModelSpec) -> ResourceRequest:
    req = requirements(model)
    assert isinstance(req, ResourceRequest)
    return req


def columns_of(snap: ClusterSnapshot, model: ModelSpec, names: list[str] | None = None) -> CandidateSet:
    cset = fit_columns(snap, model, request_of(model), snap.worker_names() if names is None else names)
    assert cset is not None
    return cset


@pytest.mark.parametrize("model", MODELS, ids=[m.name for m in MODELS])
def test_columns_carry_the_same_candidates_and_pick_the_same_one(model: ModelSpec) -> None:
    snap = cluster()
    req = requirements(model)
    assert isinstance(req, ResourceRequest)
    names = snap.worker_names()
    reference = run_fitting(snap, model, req, names)
    cset = fit_columns(snap, model, req, names)
    assert cset is not None
    key = sorted((c.worker, c.gpu_indexes, c.vram_claims) for c in reference.candidates)
    assert sorted((c.worker, c.gpu_indexes, c.vram_claims) for c in as_candidates(cset)) == key
    pos = locate(snap, cset)
    assert pos is not None
    fast = score_columns(snap, model, cset, pos)
    slow = run_scoring(snap, model, reference.candidates)
    assert fast is not None and fast.candidate == slow.candidate
    assert fast.score == pytest.approx(slow.score)


def test_candidates_taken_since_fitting_are_skipped() -> None:
    snap = cluster()
    model = MODELS[2]
    cset = columns_of(snap, model)
    pos = locate(snap, cset)
    assert pos is not None
    first = score_columns(snap, model, cset, pos)
    assert first is not None
    c = first.candidate
    snap.upsert_instance(Instance(id="mine", model=model.name, state=InstanceState.SCHEDULED, worker=c.worker,
                                  gpu_indexes=c.gpu_indexes, vram_claims=c.vram_claims))
    second = score_columns(snap, model, cset, pos)
    assert second is not None and (second.candidate.worker, second.candidate.gpu_indexes) != (
        c.worker, c.gpu_indexes)


def test_positions_located_before_a_row_was_reused_are_never_scored() -> None:
    gpus = tuple(Gpu(index=g, vram_total=80 * GIB) for g in range(2))
    snap = ClusterSnapshot.from_parts(workers=[Worker(name="w1", gpus=gpus, ram_total=64 * GIB, last_heartbeat=100.0)])
    model = ModelSpec(name="emb", weight_bytes=2 * GIB)
    cset = columns_of(snap, model)
    pos = locate(snap, cset)
    assert pos is not None
    snap.remove_worker("w1")
    snap.upsert_worker(Worker(name="zz", gpus=gpus, ram_total=64 * GIB, last_heartbeat=100.0))  # takes w1's row
    assert score_columns(snap, model, cset, pos) is None


def test_nothing_fitting_gives_no_columns() -> None:
    snap = cluster()
    huge = ModelSpec(name="huge", vram_claim=500 * GIB)
    req = requirements(huge)
    assert isinstance(req, ResourceRequest)
    assert fit_columns(snap, huge, req, snap.worker_names()) is None


def test_equal_claims_travel_once_and_differing_claims_per_candidate() -> None:
    snap = cluster()
    for model, uniform in ((MODELS[0], True), (MODELS[2], False)):  # embedding: W-based; vLLM: a GPU fraction
        cset = columns_of(snap, model)
        assert (cset.claims == b"") is uniform
        assert len(cset.gpus) == len(cset.workers)  # 4 GPUs a worker: a one-byte mask each


def test_gpus_listed_out_of_index_order_keep_their_own_claims() -> None:
    sizes = {3: 24, 0: 80, 2: 48, 1: 80}  # inventory order is not index order
    worker = Worker(name="w0", gpus=tuple(Gpu(index=i, vram_total=v * GIB) for i, v in sizes.items()),
                    ram_total=256 * GIB, last_heartbeat=100.0)
    snap = ClusterSnapshot.from_parts(workers=[worker])
    model = MODELS[2]
    req = requirements(model)
    assert isinstance(req, ResourceRequest)
    reference = run_fitting(snap, model, req, ["w0"])
    cset = fit_columns(snap, model, req, ["w0"])
    assert cset is not None and cset.claims
    key = sorted((c.worker, c.gpu_indexes, c.vram_claims) for c in reference.candidates)
    assert sorted((c.worker, c.gpu_indexes, c.vram_claims) for c in as_candidates(cset)) == key
    pos = locate(snap, cset)
    assert pos is not None
    rows, slots = np.nonzero(pos.mask)
    by_index = {int(snap.g_index[r, s]): int(pos.dense_claims[r, s]) for r, s in zip(rows, slots, strict=True)}
    assert by_index == {c.gpu_indexes[0]: c.vram_claims[0] for c in reference.candidates}


@pytest.mark.parametrize(("index", "width"), [(7, 1), (8, 2), (31, 4), (63, 8)])
def test_gpu_masks_are_as_wide_as_the_highest_candidate_index(index: int, width: int) -> None:
    w = Worker(name="w0", gpus=(Gpu(index=0, vram_total=80 * GIB), Gpu(index=index, vram_total=80 * GIB)),
               ram_total=256 * GIB, last_heartbeat=100.0)
    snap = ClusterSnapshot.from_parts(workers=[w])
    cset = columns_of(snap, MODELS[0], ["w0"])
    assert len(cset.gpus) == width
    assert sorted(c.gpu_indexes for c in as_candidates(cset)) == [(0,), (index,)]
    pos = locate(snap, cset)
    assert pos is not None and sorted(int(snap.g_index[0, s]) for s in np.nonzero(pos.mask[0])[0]) == [0, index]


def test_a_gpu_indexed_past_the_widest_mask_takes_the_candidate_path() -> None:
    w = Worker(name="w0", gpus=(Gpu(index=64, vram_total=80 * GIB),), ram_total=256 * GIB, last_heartbeat=100.0)
    snap = ClusterSnapshot.from_parts(workers=[w])
    assert fit_columns(snap, MODELS[0], request_of(MODELS[0]), ["w0"]) is None


def test_a_gpu_unknown_to_the_scoring_snapshot_is_not_located() -> None:
    cset = columns_of(cluster(), MODELS[0])
    fewer = ClusterSnapshot.from_parts(workers=[
        Worker(name=f"w{i}", gpus=(Gpu(index=0, vram_total=80 * GIB),), ram_total=256 * GIB, last_heartbeat=100.0)
        for i in range(12)
    ])
    assert locate(fewer, cset) is None


def test_a_gpu_indexed_past_the_mask_is_never_taken_for_a_candidate() -> None:
    w = Worker(name="w0", gpus=(Gpu(index=63, vram_total=80 * GIB), Gpu(index=127, vram_total=80 * GIB)),
               ram_total=256 * GIB, last_heartbeat=100.0)
    snap = ClusterSnapshot.from_parts(workers=[w])
    cset = CandidateSet(model="emb", strategy="single_gpu", workers=("w0",),
                        gpus=(1 << 63).to_bytes(8, "little"), claim=6 * GIB)
    pos = locate(snap, cset)
    assert pos is not None and [int(snap.g_index[0, s]) for s in np.nonzero(pos.mask[0])[0]] == [63]
