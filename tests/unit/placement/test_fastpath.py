"""The core's public fast path decides what the candidate path decides, without building candidates."""

from __future__ import annotations

import numpy as np
import pytest

from shared.core.placement import (
    ClusterSnapshot,
    Positions,
    fit_gpus,
    requirements,
    run_fitting,
    run_scoring,
    score_gpus,
    score_positions,
)
from shared.core.placement.domain import GIB, Gpu, Instance, InstanceState, ModelSpec, ResourceRequest, Worker


def cluster() -> ClusterSnapshot:
    workers = [
        Worker(name=f"w{i}", gpus=tuple(Gpu(index=g, vram_total=(24 if i % 2 else 80) * GIB) for g in range(4)),
               ram_total=256 * GIB, last_heartbeat=100.0)
        for i in range(6)
    ]
    snap = ClusterSnapshot.from_parts(workers=workers)
    snap.upsert_instance(Instance(id="x", model="other", state=InstanceState.RUNNING, worker="w0",
                                  gpu_indexes=(1,), vram_claims=(60 * GIB,)))
    return snap


def request(model: ModelSpec) -> ResourceRequest:
    req = requirements(model)
    assert isinstance(req, ResourceRequest)
    return req


SMALL = ModelSpec(name="small", weight_bytes=14 * GIB)
TP2 = ModelSpec(name="tp2", weight_bytes=60 * GIB, backend_parameters=("--tensor-parallel-size=2",))


def test_fit_gpus_holds_the_candidates_run_fitting_lists() -> None:
    snap = cluster()
    fit = fit_gpus(snap, SMALL, request(SMALL), snap.worker_names())
    assert fit is not None
    reference = run_fitting(snap, SMALL, request(SMALL), snap.worker_names())
    assert fit.strategy == reference.strategy
    rows, slots = fit.batch.positions()
    got = sorted((snap.name_of(int(r)), int(snap.g_index[r, s])) for r, s in zip(rows, slots, strict=True))
    assert got == sorted((c.worker, c.gpu_indexes[0]) for c in reference.candidates)


def test_score_gpus_makes_the_decision_run_scoring_makes() -> None:
    snap = cluster()
    fit = fit_gpus(snap, SMALL, request(SMALL), snap.worker_names())
    assert fit is not None
    fast = score_gpus(snap, SMALL, fit)
    slow = run_scoring(snap, SMALL, run_fitting(snap, SMALL, request(SMALL), snap.worker_names()).candidates)
    assert fast is not None and fast.candidate == slow.candidate
    assert fast.score == pytest.approx(slow.score)
    assert fast.candidates_considered == slow.candidates_considered


def test_fit_gpus_is_none_when_the_winner_is_not_single_gpu() -> None:
    snap = cluster()
    assert fit_gpus(snap, TP2, request(TP2), snap.worker_names()) is None
    assert run_fitting(snap, TP2, request(TP2), snap.worker_names()).candidates  # the candidate path has them


def test_located_candidates_are_rescored_as_the_snapshot_fills_and_dropped_when_stale() -> None:
    snap = cluster()
    fit = fit_gpus(snap, SMALL, request(SMALL), snap.worker_names())
    assert fit is not None
    rows, slots = fit.batch.positions()
    claims = np.broadcast_to(fit.batch.claims, fit.batch.mask.shape)[rows, slots]
    pos = Positions.of(snap, rows, slots, claims)
    first = score_positions(snap, SMALL, pos, fit.batch.ram_claim, fit.strategy)
    assert first is not None
    c = first.candidate
    snap.upsert_instance(Instance(id="mine", model="small", state=InstanceState.SCHEDULED, worker=c.worker,
                                  gpu_indexes=c.gpu_indexes, vram_claims=(80 * GIB,)))  # that GPU is full now
    second = score_positions(snap, SMALL, pos, fit.batch.ram_claim, fit.strategy)
    assert second is not None and (second.candidate.worker, second.candidate.gpu_indexes) != (c.worker, c.gpu_indexes)
    snap.remove_worker("w5")
    snap.upsert_worker(Worker(name="zz", gpus=(Gpu(index=0, vram_total=80 * GIB),), ram_total=GIB, last_heartbeat=1))
    assert score_positions(snap, SMALL, pos, fit.batch.ram_claim, fit.strategy) is None  # rows moved: stale
