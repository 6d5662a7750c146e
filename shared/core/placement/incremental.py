"""Single-GPU decisions in a row at a time: each worker's best per-GPU score kept, only the rows that moved rescored.

The scoring service makes decision after decision on one snapshot, each choice assumed into it before the next,
and between its batches only the workers that took a replica or reported new usage change. Yet ``best_gpu``
starts from every GPU of the cluster each time (which still fit, each one's score, each worker's best): 8,000
GPUs at 1,000 workers, most of a decision's cost.

With the profile's parts in ``best_gpu``'s shape (one part varies within rows, the others are per-worker
columns), the varying part's scorer may say it is row-local (``Scorer.slot_rows``): a GPU's score reads only its
own worker's row. Then what a decision needs of it, per worker, is kept (``_Kept``: which GPUs still fit, their
weighted scores, the row's best), and brought up to date for just the rows whose stamp moved
(``ClusterSnapshot.w_stamp``: every change to a row's columns stamps it). The per-worker columns are cheap and
may read anything (the model's file readiness, the whole cluster): they are computed afresh each decision. The
rows' totals, keys and the pick among the best rows are ``best_gpu``'s own expressions (``pick_in_rows``), over
the same values: the choice, its total and its breakdown are the full path's, to the bit. Anything else (a
non-row-local varying part, two varying parts, a non-finite key, nothing fitting) returns None, and the caller
takes the full path. Property tests compare the two over random clusters, events and batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

from shared.core.placement import lru
from shared.core.placement.best_gpu import keys_of, pick_in_rows, row_max
from shared.core.placement.choice import GpuPick, Parts, breakdown_at
from shared.core.placement.context import PlacementContext
from shared.core.placement.fitting import GpuBatch
from shared.core.placement.pipeline import QUANTUM, factor
from shared.core.placement.positions import Positions
from shared.core.placement.scorers import SCORERS
from shared.core.placement.scorers.base import Scorer, SlotRows
from shared.core.placement.snapshot import BoolArray, ClusterSnapshot, FloatArray, IntArray

_MEMO = "incremental.kept"
_COLUMNS = "incremental.columns"
_FEW_ROWS = 4  # up to this many moved rows are refreshed in Python values
# Kept states (one per candidate set and varying-part key in use: models of one shape share one); beyond this many
# the least recently used is dropped (``lru``).
_KEPT = 8

Picked = tuple[GpuBatch, GpuPick]  # the candidates still fitting, the choice among them


class NothingFits(Enum):
    """``pick_kept``'s answer when its kept rows show no candidate still fits: the full path would re-check
    every row only to find the same (the kept mask is its ``still_fitting``), so the caller answers at once."""

    NOTHING_FITS = "nothing fits"


NOTHING_FITS = NothingFits.NOTHING_FITS


def fitting_rows(snapshot: ClusterSnapshot, pos: Positions, rows: IntArray | slice, ram_claim: int,
                 cpu_claim: int) -> BoolArray:
    """``fastpath.still_fitting`` over the given rows only: element-wise over each row's own columns."""
    live = snapshot.w_present[rows] & ~snapshot.w_cordoned[rows]
    if ram_claim:
        live = live & (snapshot.w_ram_alloc[rows] >= ram_claim)
    if cpu_claim:
        live = live & (snapshot.w_cpu_alloc[rows] >= cpu_claim)
    # One buffer, and the per-worker condition applied to whole rows: broadcasting a (rows, 1) column over
    # the short slot axis cost as much as the three element-wise steps together (this runs every decision).
    ok: BoolArray = np.greater_equal(snapshot.g_alloc[rows], pos.dense_claims[rows])
    ok &= pos.mask[rows]
    ok &= snapshot.g_ok[rows]
    ok[~live] = False
    return ok


@dataclass
class _Kept:
    """The varying part over every ``[row, slot]`` of one candidate set, as of each row's ``stamp``."""

    pos: Positions  # held, so that ``id(pos)`` in the key cannot name another set
    layout: int
    stamp: IntArray
    mask: BoolArray  # which candidates still fit
    values: FloatArray  # the varying part's weighted scores
    best: FloatArray  # each row's highest value over its candidates (−inf without one)
    counts: IntArray  # candidates per row
    count: int


def _fill(kept: _Kept, rows: IntArray | slice, snap: ClusterSnapshot, ram: int, cpu: int, form: SlotRows,
          k: float) -> None:
    """Recompute ``rows`` of ``kept`` from the snapshot."""
    mask = fitting_rows(snap, kept.pos, rows, ram, cpu)
    raw = form.score(np.arange(kept.mask.shape[0], dtype=np.int64) if isinstance(rows, slice) else rows)
    values = raw if k == 1.0 else raw * k  # as ``pipeline._batch_parts`` weighs a part
    counts = np.count_nonzero(mask, axis=1)
    kept.count += int(counts.sum()) - int(kept.counts[rows].sum())
    kept.mask[rows] = mask
    kept.values[rows] = values
    kept.best[rows] = row_max(values, mask)
    kept.counts[rows] = counts


def _fill_few(kept: _Kept, rows: list[int], snap: ClusterSnapshot, ram: int, cpu: int, form: SlotRows,
              k: float) -> None:
    """``_fill`` for a few rows (a decision moves one or two) in Python values: the same comparisons, and each
    row's best the largest value over its candidates as numpy's reduction gives it (a NaN wins; the sign of a
    zero best does not matter: ``0.0 + x`` sums it into a row total the same way either way), without the
    dozen numpy calls that cost more than the work on a handful of GPUs."""
    listed: list[list[float]] = []
    if form.score_row is None:
        listed = form.score(np.array(rows, dtype=np.int64)).tolist()
    pos = kept.pos
    for i, r in enumerate(rows):
        live = bool(snap.w_present[r]) and not snap.w_cordoned[r] and (not ram or snap.w_ram_alloc[r] >= ram) \
            and (not cpu or snap.w_cpu_alloc[r] >= cpu)
        mask = [live and m and ok and a >= c for m, ok, a, c in zip(
            pos.mask[r].tolist(), snap.g_ok[r].tolist(), snap.g_alloc[r].tolist(), pos.dense_claims[r].tolist(),
            strict=True)]
        row = form.score_row(r) if form.score_row is not None else listed[i]
        if k != 1.0:
            row = [v * k for v in row]  # as ``pipeline._batch_parts`` weighs a part: the same IEEE products
        fitting = [v for v, m in zip(row, mask, strict=True) if m]
        count = len(fitting)
        best = -math.inf if not fitting else math.nan if any(v != v for v in fitting) else max(fitting)
        kept.count += count - int(kept.counts[r])
        kept.counts[r] = count
        kept.mask[r] = mask
        kept.values[r] = row
        kept.best[r] = best


def _kept(snap: ClusterSnapshot, pos: Positions, ram: int, cpu: int, form: SlotRows, k: float) -> _Kept:
    """The state for this candidate set and varying part, brought up to date (made on first use)."""
    key = (id(pos), ram, cpu, form.key, k)
    kept: _Kept | None = lru.used(snap.memo, _MEMO, key)
    stamp = snap.w_stamp[: pos.mask.shape[0]]
    if kept is None or kept.pos is not pos or kept.layout != snap.layout:
        rows, width = pos.mask.shape
        kept = _Kept(pos=pos, layout=snap.layout, stamp=stamp.copy(), mask=np.zeros((rows, width), dtype=np.bool_),
                     values=np.zeros((rows, width), dtype=np.float64), best=np.full(rows, -np.inf),
                     counts=np.zeros(rows, dtype=np.int64), count=0)
        _fill(kept, slice(0, rows), snap, ram, cpu, form, k)
        lru.keep(snap.memo, _MEMO, key, kept, _KEPT)
        return kept
    moved = np.flatnonzero(stamp != kept.stamp)
    if len(moved) > len(stamp) // 4:
        _fill(kept, slice(0, len(stamp)), snap, ram, cpu, form, k)
    elif len(moved) > _FEW_ROWS:
        _fill(kept, moved, snap, ram, cpu, form, k)
    elif len(moved):
        _fill_few(kept, moved.tolist(), snap, ram, cpu, form, k)
    kept.stamp[moved] = stamp[moved]
    return kept


@dataclass
class _Column:
    """A row-local per-worker column as of each row's ``stamp``."""

    layout: int
    stamp: IntArray
    values: FloatArray


def _column(snap: ClusterSnapshot, form: SlotRows) -> FloatArray:
    """A row-local column (unweighted, as ``score_batch`` returns it), its moved rows recomputed."""
    rows = snap.rows
    stamp = snap.w_stamp[:rows]
    kept: _Column | None = lru.used(snap.memo, _COLUMNS, form.key)
    if kept is None or kept.layout != snap.layout or len(kept.stamp) != rows:
        kept = _Column(layout=snap.layout, stamp=stamp.copy(), values=form.score(np.arange(rows, dtype=np.int64)))
        lru.keep(snap.memo, _COLUMNS, form.key, kept, _KEPT)
        return kept.values
    moved = np.flatnonzero(stamp != kept.stamp)
    if len(moved):
        kept.values[moved] = form.score(moved)
        kept.stamp[moved] = stamp[moved]
    return kept.values


def _varying(ctx: PlacementContext, scorers: Sequence[tuple[float, Scorer]], claims: IntArray, ram: int,
             cpu: int) -> tuple[int, SlotRows] | None:
    """The one scorer whose scores vary within rows, in row-local form; None if none or several offer one."""
    found: tuple[int, SlotRows] | None = None
    for i, (_, scorer) in enumerate(scorers):
        form = scorer.slot_rows(ctx, claims, ram, cpu)
        if form is not None:
            if found is not None:
                return None
            found = (i, form)
    return found


def pick_kept(ctx: PlacementContext, pos: Positions, ram_claim: int,
              cpu_claim: int) -> Picked | NothingFits | None:
    """The candidates of ``pos`` that still fit and the full path's pick among them, from kept per-row state;
    ``NOTHING_FITS`` when none still fits; None when kept state does not apply (the caller takes the full path)."""
    snap = ctx.snapshot
    rows = pos.mask.shape[0]
    if pos.layout != snap.layout or rows != snap.rows:
        return None
    scorers = []
    for cfg in ctx.profile.scorers:
        scorer = SCORERS[cfg.name].configured(cfg.args, "scorer")
        scorers.append((factor(cfg, scorer.max_score), scorer))
    varying = _varying(ctx, scorers, pos.dense_claims, ram_claim, cpu_claim)
    if varying is None:
        return None
    at, form = varying
    kept = _kept(snap, pos, ram_claim, cpu_claim, form, scorers[at][0])
    if kept.count == 0:
        return NOTHING_FITS
    batch = GpuBatch(mask=kept.mask, claims=pos.dense_claims, ram_claim=ram_claim, count=kept.count,
                     cpu_claim=cpu_claim)
    parts: Parts = []
    row_total = np.zeros(rows, dtype=np.float64)
    for i, ((k, scorer), cfg) in enumerate(zip(scorers, ctx.profile.scorers, strict=True)):
        if i == at:
            parts.append((cfg.name, kept.values))
            np.add(row_total, kept.best, out=row_total)  # 0.0 + a + b + ..., in profile order, as best_gpu sums
            continue
        column = scorer.column_rows(ctx)
        raw = _column(snap, column) if column is not None else scorer.score_batch(ctx, batch)
        if raw is None or raw.shape != (rows, 1):
            return None  # a second part varies within rows (or has no fast form): the full path decides
        values = raw if k == 1.0 else raw * k
        parts.append((cfg.name, values))
        np.add(row_total, values[:, 0], out=row_total)
    row_keys = keys_of(row_total, QUANTUM)
    best_key = row_keys.max()
    if not np.isfinite(best_key):
        return None
    found = pick_in_rows(parts, kept.mask, snap.ranks(), snap.g_index, QUANTUM, np.flatnonzero(row_keys == best_key),
                         float(best_key))
    if found is None:
        return None
    r, s, total = found
    return batch, (r, s, total, breakdown_at(parts, r, s))
