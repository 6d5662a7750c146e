"""The best single-GPU candidate found from per-row maxima is the one found by summing every GPU's total: same
row, same slot, same total to the last bit, whatever the scores, ties, masks and part shapes."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import shared.core.placement.pipeline as pipeline
from shared.core.placement.best_gpu import best_gpu
from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import ResourceRequest
from shared.core.placement.fastpath import Positions, still_fitting
from shared.core.placement.fitting import GpuBatch
from shared.core.placement.lifecycle import instance_from_decision
from shared.core.placement.pipeline import QUANTUM, fit_gpus, requirements, run_filters
from shared.core.placement.profile import DEFAULT_PROFILE
from shared.core.placement.snapshot import FloatArray
from tests.unit.placement.test_properties import NOW, SETTINGS, build, clusters, models

# Few distinct values, some a float step apart: ties within and across rows, and sums that round together.
VALUES = st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.0 + 2**-40, 2.5, 66.66666666666667, 100.0, 1e-7, 3e-7, -4.0])


@st.composite
def scored_batches(draw: st.DrawFn) -> tuple[list[tuple[str, FloatArray]], np.ndarray, np.ndarray, np.ndarray]:
    """Random parts (each per GPU or per worker), a non-empty candidate mask, name ranks and GPU indexes."""
    rows, width = draw(st.integers(1, 12)), draw(st.integers(1, 8))
    parts = []
    for k in range(draw(st.integers(1, 4))):
        shape = (rows, width) if draw(st.booleans()) else (rows, 1)
        values = draw(st.lists(VALUES, min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]))
        parts.append((f"p{k}", np.array(values, dtype=np.float64).reshape(shape)))
    cells = draw(st.lists(st.booleans(), min_size=rows * width, max_size=rows * width))
    mask = np.array(cells, dtype=np.bool_).reshape(rows, width)
    mask[draw(st.integers(0, rows - 1)), draw(st.integers(0, width - 1))] = True
    ranks = np.array(draw(st.permutations(range(rows))), dtype=np.int64)
    g_index = np.array([draw(st.permutations(range(width))) for _ in range(rows)], dtype=np.int64)
    return parts, mask, ranks, g_index


def _summed(parts: list[tuple[str, FloatArray]], mask: np.ndarray, ranks: np.ndarray,
            g_index: np.ndarray) -> tuple[int, int, float]:
    """The plain form: every candidate's total and key, the best key, ties by name rank then GPU index."""
    total = np.zeros(mask.shape, dtype=np.float64)
    for _, values in parts:
        np.add(total, values, out=total)
    keys = np.where(mask, np.floor(total * QUANTUM + 0.5), -np.inf)
    rows, slots = np.nonzero(keys == keys.max())
    pick = min(range(len(rows)), key=lambda i: (ranks[rows[i]], g_index[rows[i], slots[i]]))
    return int(rows[pick]), int(slots[pick]), float(total[rows[pick], slots[pick]])


@SETTINGS
@given(scored_batches())
def test_row_maxima_pick_the_candidate_the_full_sum_picks(batch) -> None:  # type: ignore[no-untyped-def]
    parts, mask, ranks, g_index = batch
    found = best_gpu(parts, mask, ranks, g_index, QUANTUM)
    varying = sum(1 for _, v in parts if v.shape != (mask.shape[0], 1))
    if varying > 1:
        assert found is None  # only one part may vary within a row
        return
    assert found is not None
    r, s, total = found
    er, es, etotal = _summed(parts, mask, ranks, g_index)
    assert (r, s) == (er, es)
    assert np.float64(total).tobytes() == np.float64(etotal).tobytes()


def test_two_parts_varying_within_rows_fall_back_to_the_full_sum() -> None:
    a = np.array([[1.0, 2.0]])
    assert best_gpu([("a", a), ("b", a)], np.ones((1, 2), dtype=np.bool_), np.zeros(1, dtype=np.int64),
                    np.array([[0, 1]]), QUANTUM) is None


@SETTINGS
@given(clusters(), models(), st.integers(1, 6))
def test_batches_of_replicas_choose_as_the_summed_path(parts, model, replicas) -> None:  # type: ignore[no-untyped-def]
    """The scoring service's loop (candidates located once, each choice assumed before the next): every
    replica's choice, total and breakdown are those of summing every GPU's total."""
    snap = build(parts)
    req = requirements(model)
    if not isinstance(req, ResourceRequest):
        return
    fit = fit_gpus(snap, model, req, run_filters(snap, model, NOW).survivors)
    if fit is None:
        return
    rows, slots = fit.batch.positions()
    claims = np.broadcast_to(fit.batch.claims, fit.batch.mask.shape)[rows, slots]
    pos = Positions.of(snap, rows, slots, claims)
    ctx = PlacementContext(snapshot=snap, model=model, profile=DEFAULT_PROFILE)
    for n in range(replicas):
        mask = still_fitting(snap, pos, fit.batch.ram_claim, fit.batch.cpu_claim)
        if not mask.any():
            return
        batch = GpuBatch(mask=mask, claims=pos.dense_claims, ram_claim=fit.batch.ram_claim,
                         count=int(mask.sum()), cpu_claim=fit.batch.cpu_claim)
        scored = pipeline._batch_parts(ctx, batch)
        assert scored is not None
        new = pipeline._score_batch(ctx, batch)
        old = pipeline._pick_summed(ctx, batch, scored)
        assert new is not None
        assert new[:2] == old[:2] and np.float64(new[2]).tobytes() == np.float64(old[2]).tobytes()
        assert new[3] == old[3]
        decision = pipeline.score_gpus(snap, model, pipeline.GpuFit(strategy=fit.strategy, batch=batch))
        assert decision is not None
        snap.upsert_instance(instance_from_decision(decision, f"r{n}", created_at=float(n)))
