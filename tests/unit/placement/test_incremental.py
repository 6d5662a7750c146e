"""Decisions made from kept per-row state (``incremental``) are the full path's: same candidate, same total and
breakdown to the last bit, same count, over random clusters, profiles, event sequences and score values (ties,
-0.0, one-ulp neighbours, masks that change under the kept rows)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.core.placement import fastpath, incremental
from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import (
    GIB,
    Candidate,
    Category,
    Decision,
    Gpu,
    ModelFile,
    ModelFileState,
    ModelSpec,
    PlacementStrategy,
    ResourceRequest,
    Worker,
)
from shared.core.placement.fastpath import Positions, score_all_positions, score_positions
from shared.core.placement.fitting import GpuBatch
from shared.core.placement.lifecycle import instance_from_decision
from shared.core.placement.pipeline import fit_gpus, requirements, run_filters
from shared.core.placement.profile import DEFAULT_PROFILE, Profile, ScorerConfig
from shared.core.placement.scorers import SCORERS
from shared.core.placement.scorers.base import Scorer, SlotRows
from shared.core.placement.snapshot import ClusterSnapshot, FloatArray, IntArray
from tests.unit.placement.test_properties import NOW, SETTINGS, build, clusters, models

# Few distinct values, some a float step apart or of both zero signs: ties within and across rows.
VALUES = [0.0, -0.0, 0.5, 1.0, 1.0 + 2**-40, 1.0 - 2**-53, 2.5, 66.66666666666667, 100.0, 1e-7, 3e-7]


def full_path(snap: ClusterSnapshot, model: ModelSpec, pos: Positions, ram: int, cpu: int, strategy: str,
              profile: Profile) -> Decision | None:
    """What ``score_positions`` computed before it kept anything: every candidate re-checked and scored."""
    return score_all_positions(snap, model, pos, ram, strategy, profile, cpu)


def bits(d: Decision | None) -> object:
    """A decision with every float as its bytes (``==`` on floats takes -0.0 for 0.0)."""
    if d is None:
        return None
    return (d.candidate, d.candidates_considered, np.float64(d.score).tobytes(),
            {k: np.float64(v).tobytes() for k, v in d.breakdown.items()})


class TableScorer(Scorer):
    """A row-local per-GPU scorer reading a table the test fills (and stamps the row of, as the contract says)."""

    name = "test_table"
    max_score = 100.0
    table: ClassVar[dict[tuple[int, int], float]] = {}

    def _matrix(self, snap: ClusterSnapshot, rows: IntArray) -> FloatArray:
        width = snap.g_ok.shape[1]
        return np.array([[self.table.get((int(r), s), 0.0) for s in range(width)] for r in rows.tolist()],
                        dtype=np.float64).reshape(len(rows), width)

    def score(self, ctx: PlacementContext, candidates: Sequence[Candidate]) -> list[float]:
        """Reference path."""
        snap = ctx.snapshot
        out = []
        for c in candidates:
            slots = snap.slot_map(c.worker)
            row = snap.row_of(c.worker)
            assert slots is not None and row is not None
            out.append(self.table.get((row, slots[c.gpu_indexes[0]]), 0.0))
        return out

    def score_batch(self, ctx: PlacementContext, batch: GpuBatch) -> FloatArray:
        """Fast path."""
        return self._matrix(ctx.snapshot, np.arange(ctx.snapshot.rows, dtype=np.int64))

    def slot_rows(self, ctx: PlacementContext, claims: IntArray, ram_claim: int, cpu_claim: int) -> SlotRows:
        """Row-local form."""
        snap = ctx.snapshot
        return SlotRows(key=(self.name,), score=lambda rows: self._matrix(snap, rows))


class ColumnScorer(Scorer):
    """A per-worker column read from a table the test changes freely (columns are recomputed every decision)."""

    name = "test_column"
    max_score = 100.0
    table: ClassVar[dict[int, float]] = {}

    def score(self, ctx: PlacementContext, candidates: Sequence[Candidate]) -> list[float]:
        """Reference path."""
        return [self.table.get(ctx.snapshot.row_of(c.worker) or 0, 0.0) for c in candidates]

    def score_batch(self, ctx: PlacementContext, batch: GpuBatch) -> FloatArray:
        """Fast path."""
        return np.array([[self.table.get(r, 0.0)] for r in range(ctx.snapshot.rows)], dtype=np.float64).reshape(-1, 1)


EMB = ModelSpec(name="m", source="m", weight_bytes=2 * GIB, categories=(Category.EMBEDDING,), ram_claim=16 * GIB,
                placement_strategy=PlacementStrategy.BINPACK)


def located(snap: ClusterSnapshot, model: ModelSpec) -> tuple[Positions, int, int, str] | None:
    req = requirements(model)
    if not isinstance(req, ResourceRequest):
        return None
    fit = fit_gpus(snap, model, req, run_filters(snap, model, NOW).survivors)
    if fit is None:
        return None
    rows, slots = fit.batch.positions()
    claims = np.broadcast_to(fit.batch.claims, fit.batch.mask.shape)[rows, slots]
    return Positions.of(snap, rows, slots, claims), fit.batch.ram_claim, fit.batch.cpu_claim, fit.strategy


def restamp(snap: ClusterSnapshot, row: int) -> None:
    """Stamp a row, as any change to its columns does (the same record again: its usage recomputed)."""
    worker = snap.worker(snap.name_of(row))
    if worker is not None:
        snap.update_usage(worker)


PROFILES = st.sampled_from([
    DEFAULT_PROFILE,
    Profile(scorers=(ScorerConfig(name="placement", weight=3.0), ScorerConfig(name="worker_fill", max_score=7.0),
                     ScorerConfig(name="locality"))),
    Profile(scorers=(ScorerConfig(name="locality"), ScorerConfig(name="binpack", args={"cpu_weight": 2.0}),
                     ScorerConfig(name="worker_fill"))),
    Profile(scorers=(ScorerConfig(name="placement"), ScorerConfig(name="binpack"))),  # two vary: the full path
    Profile(scorers=(ScorerConfig(name="placement"), ScorerConfig(name="worker_balance"),
                     ScorerConfig(name="locality"))),
])


@SETTINGS
@given(clusters(), models(), PROFILES, st.lists(st.tuples(st.sampled_from(["assume", "release", "usage", "cordon",
                                                                           "file"]), st.integers(0, 50)),
                                                 min_size=1, max_size=10))
def test_kept_rows_decide_as_the_full_path_through_events(parts, model, profile, steps) -> None:  # type: ignore[no-untyped-def]
    """The scoring service's loop, with the events a snapshot gets between and during batches."""
    snap = build(parts)
    found = located(snap, model)
    if found is None:
        return
    pos, ram, cpu, strategy = found
    placed: list[str] = []
    for n, (kind, pick) in enumerate(steps):
        got = score_positions(snap, model, pos, ram, strategy, profile, cpu)
        assert bits(got) == bits(full_path(snap, model, pos, ram, cpu, strategy, profile))
        names = snap.worker_names()
        name = names[pick % len(names)]
        if kind == "assume" and got is not None:
            snap.upsert_instance(instance_from_decision(got, f"r{n}", created_at=float(n)))
            placed.append(f"r{n}")
        elif kind == "release" and placed:
            snap.remove_instance(placed.pop(pick % len(placed)))
        elif kind == "usage":  # some GPUs (or the RAM) taken or freed by processes Gantry does not manage
            w = snap.worker(name)
            assert w is not None
            gpus = tuple(msgspec.structs.replace(g, vram_used=g.vram_total * ((pick + g.index) % 3) // 2)
                         for g in w.gpus)
            snap.update_usage(msgspec.structs.replace(w, gpus=gpus, ram_used=w.ram_total * (pick % 3) // 2))
        elif kind == "cordon":
            w = snap.worker(name)
            assert w is not None
            snap.upsert_worker(msgspec.structs.replace(w, cordoned=not w.cordoned))
        elif kind == "file":
            snap.set_model_file(ModelFile(source=model.source or model.name, worker=name,
                                          state=ModelFileState.READY if pick % 2 else ModelFileState.DOWNLOADING))
    got = score_positions(snap, model, pos, ram, strategy, profile, cpu)
    assert bits(got) == bits(full_path(snap, model, pos, ram, cpu, strategy, profile))


@pytest.fixture
def table_scorers(monkeypatch: pytest.MonkeyPatch) -> Profile:
    """The two table scorers registered, their tables empty; a profile running them around a real column."""
    monkeypatch.setitem(SCORERS, TableScorer.name, TableScorer)
    monkeypatch.setitem(SCORERS, ColumnScorer.name, ColumnScorer)
    monkeypatch.setattr(TableScorer, "table", {})
    monkeypatch.setattr(ColumnScorer, "table", {})
    return Profile(scorers=(ScorerConfig(name="test_column"), ScorerConfig(name="test_table"),
                            ScorerConfig(name="worker_fill")))


def fleet(workers: int, gpus: int) -> ClusterSnapshot:
    return ClusterSnapshot.from_parts([
        Worker(name=f"w{i}", gpus=tuple(Gpu(index=g, vram_total=80 * GIB) for g in range(gpus)),
               ram_total=256 * GIB, last_heartbeat=NOW)
        for i in range(workers)
    ])


@given(data=st.data())
@settings(SETTINGS, max_examples=150, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_kept_rows_pick_as_the_full_path_over_tied_and_signed_zero_scores(table_scorers: Profile,
                                                                          data: st.DataObject) -> None:
    """Per-GPU values with ties, both zeros and one-ulp neighbours change row by row (each change stamped), the
    columns change anywhere, replicas are assumed: every decision is the full path's, bit for bit."""
    TableScorer.table.clear()
    ColumnScorer.table.clear()
    workers, gpus = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 4))
    snap = fleet(workers, gpus)
    for r in range(workers):
        ColumnScorer.table[r] = data.draw(st.sampled_from(VALUES))
        for s in range(gpus):
            TableScorer.table[(r, s)] = data.draw(st.sampled_from(VALUES))
    found = located(snap, EMB)
    assert found is not None
    pos, ram, cpu, strategy = found
    for n in range(data.draw(st.integers(1, 12))):
        got = score_positions(snap, EMB, pos, ram, strategy, table_scorers, cpu)
        assert bits(got) == bits(full_path(snap, EMB, pos, ram, cpu, strategy, table_scorers))
        kind = data.draw(st.sampled_from(["table", "column", "assume", "usage"]))
        r = data.draw(st.integers(0, workers - 1))
        if kind == "usage":  # a GPU or the RAM taken or freed outside Gantry: candidates stop or start fitting
            w = snap.worker(snap.name_of(r))
            assert w is not None
            taken = data.draw(st.integers(0, gpus - 1))
            ram = data.draw(st.sampled_from([0, 0, w.ram_total]))
            snap.update_usage(msgspec.structs.replace(w, ram_used=ram, gpus=tuple(
                msgspec.structs.replace(g, vram_used=g.vram_total if g.index == taken else 0) for g in w.gpus)))
        elif kind == "table":
            TableScorer.table[(r, data.draw(st.integers(0, gpus - 1)))] = data.draw(st.sampled_from(VALUES))
            restamp(snap, r)
        elif kind == "column":
            ColumnScorer.table[r] = data.draw(st.sampled_from(VALUES))
        elif got is not None:
            snap.upsert_instance(instance_from_decision(got, f"r{n}", created_at=float(n)))


def test_a_row_changed_without_its_stamp_is_not_seen_which_is_why_row_local_scorers_read_only_stamped_columns(
        table_scorers: Profile) -> None:
    """The contract, shown: kept rows are trusted until their stamp moves (this is what the stamp is for)."""
    snap = fleet(2, 2)
    TableScorer.table.update({(0, 0): 1.0, (0, 1): 1.0, (1, 0): 2.0, (1, 1): 1.0})
    found = located(snap, EMB)
    assert found is not None
    pos, ram, cpu, strategy = found
    first = score_positions(snap, EMB, pos, ram, strategy, table_scorers, cpu)
    assert first is not None and first.candidate.worker == "w1"
    TableScorer.table[(0, 1)] = 3.0  # unstamped: still the kept answer
    kept = score_positions(snap, EMB, pos, ram, strategy, table_scorers, cpu)
    assert kept is not None and kept.candidate.worker == "w1"
    restamp(snap, 0)
    moved = score_positions(snap, EMB, pos, ram, strategy, table_scorers, cpu)
    assert moved is not None and (moved.candidate.worker, moved.candidate.gpu_indexes) == ("w0", (1,))
    assert bits(moved) == bits(full_path(snap, EMB, pos, ram, cpu, strategy, table_scorers))


def test_binpack_decisions_come_from_kept_rows() -> None:
    """The service's common case (a binpack model, the default profile) takes the kept path."""
    snap = fleet(6, 4)
    found = located(snap, EMB)
    assert found is not None
    pos, ram, cpu, strategy = found
    for n in range(5):
        got = score_positions(snap, EMB, pos, ram, strategy, DEFAULT_PROFILE, cpu)
        assert got is not None and bits(got) == bits(full_path(snap, EMB, pos, ram, cpu, strategy, DEFAULT_PROFILE))
        snap.upsert_instance(instance_from_decision(got, f"r{n}", created_at=float(n)))
    assert snap.memo.get("incremental.kept")


def test_models_decided_often_keep_their_rows_while_more_models_than_are_kept_pass_through() -> None:
    """Two hot models, each decided between every decision of ten others (more than ``_KEPT`` sets in use): the hot
    ones' kept rows are never rebuilt (the same state object throughout), and every decision is the full path's."""
    snap = fleet(40, 4)
    located_sets = [located(snap, EMB) for _ in range(12)]  # each a candidate set of its own (its own kept state)
    assert all(found is not None for found in located_sets)
    sets = [found for found in located_sets if found is not None]
    hot, cold = sets[:2], sets[2:]

    def decide(found: tuple[Positions, int, int, str], n: int) -> None:
        pos, ram, cpu, strategy = found
        got = score_positions(snap, EMB, pos, ram, strategy, DEFAULT_PROFILE, cpu)
        assert got is not None and bits(got) == bits(full_path(snap, EMB, pos, ram, cpu, strategy, DEFAULT_PROFILE))
        snap.upsert_instance(instance_from_decision(got, f"r{n}", created_at=float(n)))

    def state_of(pos: Positions) -> object:
        return next(k for k in snap.memo["incremental.kept"].values() if k.pos is pos)

    for n, found in enumerate(hot):
        decide(found, n)
    first = [state_of(found[0]) for found in hot]
    for n, found in enumerate(cold * 2):
        for h, warm in enumerate(hot):
            decide(warm, 100 + 10 * n + h)
        decide(found, 1000 + n)
    assert all(a is b for a, b in zip((state_of(found[0]) for found in hot), first, strict=True))


def test_a_full_cluster_is_answered_from_kept_rows_without_rescanning_every_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    snap = fleet(2, 2)
    found = located(snap, EMB)
    assert found is not None
    pos, ram, cpu, strategy = found
    for n in range(64):  # place until nothing fits
        got = score_positions(snap, EMB, pos, ram, strategy, DEFAULT_PROFILE, cpu)
        if got is None:
            break
        snap.upsert_instance(instance_from_decision(got, f"r{n}", created_at=float(n)))
    assert got is None and full_path(snap, EMB, pos, ram, cpu, strategy, DEFAULT_PROFILE) is None
    ctx = PlacementContext(snapshot=snap, model=EMB, profile=DEFAULT_PROFILE)
    assert incremental.pick_kept(ctx, pos, ram, cpu) is incremental.NOTHING_FITS

    def rescan(*args: object, **kwargs: object) -> None:
        raise AssertionError("the full path re-checked every row")

    monkeypatch.setattr(fastpath, "score_all_positions", rescan)
    assert score_positions(snap, EMB, pos, ram, strategy, DEFAULT_PROFILE, cpu) is None
