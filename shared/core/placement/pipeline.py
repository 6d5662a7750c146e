"""The placement stages (filter → fit → score), their composition ``place``, and scale-down ranking.

Every stage is pure and deterministic and returns a msgspec struct, so separate services can run the
stages and pass the results on the bus. ``exhaustive=True`` runs the plain reference path (every plugin's
scalar code, every worker and GPU visited); the default uses the snapshot's columns where a plugin offers
a vectorised form. Property tests hold the two to the same decision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from shared.core.catalog.models import ModelArch
from shared.core.placement.best_gpu import best_gpu
from shared.core.placement.choice import GpuPick, Parts, Scored, breakdown_at, decision, gpu_candidate, gpu_decision
from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import (
    Candidate,
    Decision,
    FilterReport,
    FilterResult,
    FitResult,
    GgufSpec,
    Instance,
    InstanceState,
    ModelSpec,
    Reason,
    ResourceRequest,
    ScaleDownEntry,
    Unschedulable,
)
from shared.core.placement.explain import filters_message, unfit_message
from shared.core.placement.filters import FILTERS
from shared.core.placement.filters.gpu_selector import GpuSelectorFilter
from shared.core.placement.fitting import FIT_STRATEGIES, GpuBatch
from shared.core.placement.fitting.cpu_only import CpuOnly, RowBatch
from shared.core.placement.fitting.multi_gpu import GpuSetBatch, MultiGpu
from shared.core.placement.fitting.single_gpu import SingleGpu
from shared.core.placement.profile import DEFAULT_PROFILE, Profile, ScorerConfig
from shared.core.placement.requirements import estimate
from shared.core.placement.scaledown import SCALE_DOWN_SCORERS
from shared.core.placement.scorers import SCORERS
from shared.core.placement.snapshot import BoolArray, ClusterSnapshot, FloatArray

QUANTUM = 1e6  # scores are compared in millionths of a point: float noise never decides a tie


def quantize(score: float) -> float:
    """The comparison key of a score."""
    return math.floor(score * QUANTUM + 0.5)


def factor(cfg: ScorerConfig, natural_max: float) -> float:
    """Multiplier applied to a scorer's raw score: weight, and rescaling to ``max_score``."""
    scale = cfg.max_score / natural_max if cfg.max_score is not None else 1.0
    return cfg.weight * scale


# ------------------------------------------------------------------------------------------- filters


def _missing_reasons(ctx: PlacementContext) -> list[Reason]:
    return [
        Reason(plugin=GpuSelectorFilter.name, subject=gpu_id, message="selected GPU is not in the cluster")
        for gpu_id in GpuSelectorFilter.missing(ctx)
    ]


def _filter_reference(ctx: PlacementContext) -> tuple[list[str], list[FilterReport]]:
    snap = ctx.snapshot
    names = snap.worker_names()
    reports: list[FilterReport] = []
    for fname in ctx.profile.filters:
        if not names:
            break
        plugin = FILTERS[fname].configured(ctx.profile.filter_args.get(fname), "filter")
        total = len(names)
        extra = _missing_reasons(ctx) if fname == GpuSelectorFilter.name and plugin.active(ctx) else []
        if not plugin.active(ctx):
            reports.append(FilterReport(filter=fname, kept=total, total=total))
            continue
        kept: list[str] = []
        dropped: list[Reason] = []
        for name in names:
            worker = snap.worker(name)
            assert worker is not None
            why = plugin.check(ctx, worker)
            if why is None:
                kept.append(name)
            else:
                dropped.append(Reason(plugin=fname, subject=name, message=why))
        names = kept
        reports.append(FilterReport(filter=fname, kept=len(kept), total=total, dropped=tuple(dropped + extra)))
    return names, reports


def _filter_fast(ctx: PlacementContext) -> tuple[BoolArray, list[FilterReport]]:
    snap = ctx.snapshot
    mask = snap.w_present[: snap.rows].copy()
    reports: list[FilterReport] = []
    for fname in ctx.profile.filters:
        total = int(np.count_nonzero(mask))
        if total == 0:
            break
        plugin = FILTERS[fname].configured(ctx.profile.filter_args.get(fname), "filter")
        if not plugin.active(ctx):
            reports.append(FilterReport(filter=fname, kept=total, total=total))
            continue
        keep = plugin.keep_mask(ctx)
        gone = np.flatnonzero(mask > keep)
        dropped = []
        for name in sorted(snap.name_of(int(r)) for r in gone):
            worker = snap.worker(name)
            assert worker is not None
            dropped.append(Reason(plugin=fname, subject=name, message=plugin.check(ctx, worker) or "dropped"))
        if fname == GpuSelectorFilter.name:
            dropped += _missing_reasons(ctx)
        mask &= keep
        reports.append(
            FilterReport(filter=fname, kept=int(np.count_nonzero(mask)), total=total, dropped=tuple(dropped))
        )
    return mask, reports


def _names(snap: ClusterSnapshot, mask: BoolArray) -> list[str]:
    return snap.names_where(mask)


def _mask(snap: ClusterSnapshot, names: Sequence[str]) -> BoolArray:
    mask = np.zeros(snap.rows, dtype=np.bool_)
    rows = snap.rows_of(tuple(names))
    mask[rows[rows >= 0]] = True
    return mask


def run_filters(
    snapshot: ClusterSnapshot,
    model: ModelSpec,
    now: float,
    profile: Profile = DEFAULT_PROFILE,
    *,
    exhaustive: bool = False,
) -> FilterResult:
    """Run the profile's filter chain; survivors are sorted by name."""
    ctx = PlacementContext(snapshot=snapshot, model=model, profile=profile, now=now)
    if exhaustive:
        names, reports = _filter_reference(ctx)
    else:
        mask, reports = _filter_fast(ctx)
        names = _names(snapshot, mask)
    return FilterResult(model=model.name, survivors=tuple(names), reports=tuple(reports))


def filter_rows(
    snapshot: ClusterSnapshot, model: ModelSpec, now: float, profile: Profile = DEFAULT_PROFILE
) -> tuple[BoolArray, tuple[FilterReport, ...]]:
    """``run_filters``' fast path with the survivors left as a mask over the snapshot's rows (their names:
    ``ClusterSnapshot.names_where``): a caller filtering many models names each distinct mask once."""
    mask, reports = _filter_fast(PlacementContext(snapshot=snapshot, model=model, profile=profile, now=now))
    return mask, tuple(reports)


# ------------------------------------------------------------------------------------------- fitting


def _candidate_key(c: Candidate) -> tuple[str, tuple[int, ...], tuple[str, ...]]:
    return (c.worker, c.gpu_indexes, tuple(s.worker for s in c.subordinates))


@dataclass
class _Fitted:
    strategy: str | None = None
    batch: GpuBatch | GpuSetBatch | RowBatch | None = None
    candidates: list[Candidate] = field(default_factory=list)
    reasons: list[Reason] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return bool(self.candidates) or (self.batch is not None and len(self.batch) > 0)


def _fit(ctx: PlacementContext, survivors: BoolArray, exhaustive: bool) -> _Fitted:
    fitted = _Fitted()
    names: list[str] | None = None
    for sname in ctx.profile.fit_strategies:
        strategy = FIT_STRATEGIES[sname].configured(ctx.profile.fit_args.get(sname), "fit strategy")
        skip = "GPUs are selected explicitly" if ctx.selected_ids and sname != "manual" else strategy.skip(ctx)
        if skip:
            fitted.reasons.append(Reason(plugin=sname, subject="", message=f"skipped: {skip}"))
            continue
        if not exhaustive and isinstance(strategy, SingleGpu | MultiGpu | CpuOnly):
            batch = strategy.fit_batch(ctx, survivors)
            if batch is not None:
                if len(batch):
                    fitted.strategy, fitted.batch = sname, batch
                    return fitted
                note = strategy.batch_note(ctx, survivors) if isinstance(strategy, CpuOnly) else "no candidates"
                fitted.reasons.append(Reason(plugin=sname, subject="", message=note))
                continue
        if names is None:
            names = _names(ctx.snapshot, survivors)
        outcome = strategy.fit(ctx, [ctx.view(n) for n in names])
        if outcome.candidates:
            fitted.strategy = sname
            fitted.candidates = sorted(outcome.candidates, key=_candidate_key)
            return fitted
        fitted.reasons.append(Reason(plugin=sname, subject="", message="; ".join(outcome.notes) or "no candidates"))
    return fitted


def _set_candidates(ctx: PlacementContext, batch: GpuSetBatch, strategy: str) -> list[Candidate]:
    snap = ctx.snapshot
    out = [
        Candidate(
            worker=snap.name_of(r),
            gpu_indexes=tuple(idx),
            vram_claims=tuple(claims),
            ram_claim=batch.ram_claim,
            strategy=strategy,
            cpu_claim=batch.cpu_claim,
        )
        for r, idx, claims in zip(
            batch.rows.tolist(), batch.indexes.tolist(), batch.claims.tolist(), strict=True
        )
    ]
    return sorted(out, key=_candidate_key)


def _row_candidates(ctx: PlacementContext, batch: RowBatch, strategy: str) -> list[Candidate]:
    layers = batch.total_layers
    out = [
        Candidate(worker=ctx.snapshot.name_of(r), gpu_indexes=(), vram_claims=(), ram_claim=batch.ram_claim,
                  strategy=strategy, total_layers=layers, offload_layers=0 if layers is not None else None,
                  cpu_claim=batch.cpu_claim)
        for r in batch.rows.tolist()
    ]
    return sorted(out, key=_candidate_key)


def _batch_candidates(
    ctx: PlacementContext, batch: GpuBatch | GpuSetBatch | RowBatch, strategy: str
) -> list[Candidate]:
    if isinstance(batch, GpuSetBatch):
        return _set_candidates(ctx, batch, strategy)
    if isinstance(batch, RowBatch):
        return _row_candidates(ctx, batch, strategy)
    snap = ctx.snapshot
    rows, slots = batch.positions()
    indexes = snap.g_index[rows, slots].tolist()
    claims = np.broadcast_to(batch.claims, batch.mask.shape)[rows, slots].tolist()
    out = [
        Candidate(
            worker=snap.name_of(r),
            gpu_indexes=(i,),
            vram_claims=(c,),
            ram_claim=batch.ram_claim,
            strategy=strategy,
            cpu_claim=batch.cpu_claim,
        )
        for r, i, c in zip(rows.tolist(), indexes, claims, strict=True)
    ]
    return sorted(out, key=_candidate_key)


def run_fitting(
    snapshot: ClusterSnapshot,
    model: ModelSpec,
    request: ResourceRequest,
    survivors: Sequence[str],
    profile: Profile = DEFAULT_PROFILE,
    *,
    exhaustive: bool = False,
    top: int | None = None,
) -> FitResult:
    """Try the profile's fit strategies in order over ``survivors``; the first with candidates wins.

    When nothing fits, ``message`` is the spec §5 explanation and ``reasons`` say what each strategy did.
    With ``top``, only the ``top`` best candidates by the profile's scorers (over all candidates) are
    returned: the shortlist always holds ``place``'s choice, and ``top=1`` is exactly that choice. Scorers
    that normalise over the candidate set (spread) may rank a shortlist slightly differently when it is
    re-scored. Without ``top``, large clusters yield thousands of candidates.
    """
    ctx = PlacementContext(snapshot=snapshot, model=model, profile=profile, request=request)
    mask = _mask(snapshot, survivors)
    fitted = _fit(ctx, mask, exhaustive)
    if not fitted.found:
        return FitResult(model=model.name, reasons=tuple(fitted.reasons), message=unfit_message(ctx, mask))
    if top is not None:
        candidates = _top_candidates(ctx, fitted, max(top, 1), exhaustive)
    elif fitted.batch is not None:
        candidates = _batch_candidates(ctx, fitted.batch, fitted.strategy or "")
    else:
        candidates = fitted.candidates
    return FitResult(
        model=model.name, candidates=tuple(candidates), strategy=fitted.strategy, reasons=tuple(fitted.reasons)
    )


def _top_candidates(ctx: PlacementContext, fitted: _Fitted, top: int, exhaustive: bool) -> list[Candidate]:
    """The ``top`` best candidates (score, then worker name and GPU indexes), in candidate-key order."""
    snap, strategy, batch = ctx.snapshot, fitted.strategy or "", fitted.batch
    totals = _batch_totals(ctx, batch) if batch is not None and not exhaustive else None
    if batch is None or totals is None:
        candidates = fitted.candidates if batch is None else _batch_candidates(ctx, batch, strategy)
        _, scores = _reference_totals(ctx, candidates)
        order = sorted(range(len(candidates)), key=lambda i: (-quantize(scores[i]), _candidate_key(candidates[i])))
        return sorted((candidates[i] for i in order[:top]), key=_candidate_key)
    _, total = totals
    keys = np.floor(total * QUANTUM + 0.5)
    if isinstance(batch, GpuBatch):
        rows, slots = batch.positions()
        pick = np.lexsort((snap.g_index[rows, slots], snap.ranks()[rows], -keys[rows, slots]))[:top]
        mask = np.zeros_like(batch.mask)
        mask[rows[pick], slots[pick]] = True
        kept: GpuBatch | GpuSetBatch | RowBatch = GpuBatch(
            mask=mask, claims=batch.claims, ram_claim=batch.ram_claim, count=len(pick), cpu_claim=batch.cpu_claim
        )
    else:
        columns = [batch.indexes[:, k] for k in reversed(range(batch.width))] if isinstance(batch, GpuSetBatch) else []
        pick = np.lexsort((*columns, snap.ranks()[batch.rows], -keys))[:top]
        if isinstance(batch, GpuSetBatch):
            kept = GpuSetBatch(rows=batch.rows[pick], slots=batch.slots[pick], indexes=batch.indexes[pick],
                               claims=batch.claims[pick], ram_claim=batch.ram_claim, cpu_claim=batch.cpu_claim)
        else:
            kept = RowBatch(rows=batch.rows[pick], ram_claim=batch.ram_claim, total_layers=batch.total_layers,
                            cpu_claim=batch.cpu_claim)
    return _batch_candidates(ctx, kept, strategy)


# ------------------------------------------------------------------------------------------- scoring


def _reference_totals(
    ctx: PlacementContext, candidates: Sequence[Candidate]
) -> tuple[list[tuple[str, list[float]]], list[float]]:
    parts: list[tuple[str, list[float]]] = []
    for cfg in ctx.profile.scorers:
        scorer = SCORERS[cfg.name].configured(cfg.args, "scorer")
        k = factor(cfg, scorer.max_score)
        parts.append((cfg.name, [raw * k for raw in scorer.score(ctx, candidates)]))
    totals = []
    for i in range(len(candidates)):
        total = 0.0
        for _, values in parts:
            total = total + values[i]
        totals.append(total)
    return parts, totals


def _score_reference(
    ctx: PlacementContext, candidates: Sequence[Candidate]
) -> tuple[int, float, dict[str, float]]:
    parts, totals = _reference_totals(ctx, candidates)
    best = min(range(len(candidates)), key=lambda i: (-quantize(totals[i]), _candidate_key(candidates[i])))
    return best, totals[best], {name: values[best] for name, values in parts}


def _batch_parts(ctx: PlacementContext, batch: GpuBatch | GpuSetBatch | RowBatch) -> Parts | None:
    """Each scorer's weighted scores over a fast-path batch; None if a scorer has no fast form."""
    parts: Parts = []
    for cfg in ctx.profile.scorers:
        scorer = SCORERS[cfg.name].configured(cfg.args, "scorer")
        if isinstance(batch, GpuBatch):
            raw = scorer.score_batch(ctx, batch)
        elif isinstance(batch, GpuSetBatch):
            raw = scorer.score_sets(ctx, batch)
        else:
            raw = scorer.score_rows(ctx, batch)
        if raw is None:
            return None
        k = factor(cfg, scorer.max_score)
        parts.append((cfg.name, raw if k == 1.0 else raw * k))  # x × 1.0 is x: skipping it changes no bit
    return parts


def _sum_parts(parts: Parts, shape: tuple[int, ...]) -> FloatArray:
    total: FloatArray = np.zeros(shape, dtype=np.float64)
    for _, values in parts:  # 0.0 + a + b + ..., in profile order, as the reference path sums
        np.add(total, values, out=total)  # the same sums, without a new array per scorer
    return total


def _batch_totals(ctx: PlacementContext, batch: GpuBatch | GpuSetBatch | RowBatch) -> tuple[Parts, FloatArray] | None:
    """Each scorer's weighted scores and their sum over a fast-path batch; None if a scorer has no fast form."""
    parts = _batch_parts(ctx, batch)
    if parts is None:
        return None
    shape = batch.mask.shape if isinstance(batch, GpuBatch) else (len(batch),)
    return parts, _sum_parts(parts, shape)


def _score_batch(ctx: PlacementContext, batch: GpuBatch) -> GpuPick | None:
    """(row, slot, total, breakdown) of the best single-GPU candidate, or None if a scorer has no fast path.

    This runs once per decision over every GPU of the cluster: ``best_gpu`` finds the choice from per-row
    maxima where the scorers' shapes allow it, and ``_pick_summed`` (every GPU's total) otherwise; both
    choose the same candidate with the same total (property tests compare them on random batches).
    """
    parts = _batch_parts(ctx, batch)
    if parts is None:
        return None
    snap = ctx.snapshot
    found = best_gpu(parts, batch.mask, snap.ranks(), snap.g_index, QUANTUM)
    if found is None:
        return _pick_summed(ctx, batch, parts)
    r, s, total = found
    return r, s, total, breakdown_at(parts, r, s)


def _pick_summed(ctx: PlacementContext, batch: GpuBatch, parts: Parts) -> GpuPick:
    """``_score_batch``'s choice from every candidate's total (the general form)."""
    shape = batch.mask.shape
    total = _sum_parts(parts, shape)
    # floor(total × QUANTUM + 0.5) where a candidate is, −inf elsewhere: computed in one buffer (this runs once per
    # decision over every GPU of the cluster; each temporary array cost as much as a scorer), same values.
    keys = total * QUANTUM
    keys += 0.5
    np.floor(keys, out=keys)
    keys[~batch.mask] = -np.inf
    keys = keys.ravel()
    top = keys == keys.max()
    width = shape[1]
    if np.count_nonzero(top) == 1:
        best = int(np.argmax(top))
    else:  # the first worker by name, then its lowest GPU index (one pass: an empty cluster ties everywhere)
        tied = np.flatnonzero(top)
        snap = ctx.snapshot
        rows, slots = tied // width, tied % width
        order = (snap.ranks()[rows] << 32) + snap.g_index[rows, slots]
        best = int(tied[np.argmin(order)])
    r, s = divmod(best, width)
    return r, s, float(total[r, s]), breakdown_at(parts, r, s)


def _score_sets(
    ctx: PlacementContext, batch: GpuSetBatch | RowBatch
) -> tuple[int, float, dict[str, float]] | None:
    """(candidate position, total, breakdown) of the best multi-GPU set or CPU-only worker, or None when a
    scorer has no fast form."""
    totals = _batch_totals(ctx, batch)
    if totals is None:
        return None
    parts, total = totals
    keys = np.floor(total * QUANTUM + 0.5)
    tied = np.flatnonzero(keys == keys.max())
    if len(tied) == 1:
        best = int(tied[0])
    else:
        ranks = ctx.snapshot.ranks()[batch.rows[tied]]
        width = batch.width if isinstance(batch, GpuSetBatch) else 0
        columns = [batch.indexes[tied, k] for k in reversed(range(width))] if isinstance(batch, GpuSetBatch) else []
        best = int(tied[np.lexsort((*columns, ranks))[0]])
    return best, float(total[best]), {name: float(values[best]) for name, values in parts}


def _score_candidates_fast(ctx: PlacementContext, candidates: Sequence[Candidate]) -> Scored | None:
    """Score a candidate list through the column fast path when its shape allows it, else None.

    Allowed: every candidate on one worker of the snapshot, with the same GPU count (at least one), the
    same RAM claim, no subordinates and no two candidates on the same GPU set.
    """
    snap = ctx.snapshot
    first = candidates[0]
    width = len(first.gpu_indexes)
    if any(c.subordinates or len(c.gpu_indexes) != width or c.ram_claim != first.ram_claim
           or c.cpu_claim != first.cpu_claim for c in candidates):
        return None
    if width == 0:
        cpu_rows = [snap.row_of(c.worker) for c in candidates]
        if None in cpu_rows or len(set(cpu_rows)) != len(cpu_rows):
            return None
        picked_row = _score_sets(ctx, RowBatch(rows=np.array(cpu_rows, dtype=np.int64), ram_claim=first.ram_claim,
                                                total_layers=first.total_layers, cpu_claim=first.cpu_claim))
        if picked_row is None:
            return None
        best_row, total_row, breakdown_row = picked_row
        return candidates[best_row], total_row, breakdown_row
    rows: list[int] = []
    slots: list[list[int]] = []
    for c in candidates:
        row = snap.row_of(c.worker)
        slot_of = snap.slot_map(c.worker)
        if row is None or slot_of is None or any(i not in slot_of for i in c.gpu_indexes):
            return None
        rows.append(row)
        slots.append([slot_of[i] for i in c.gpu_indexes])
    if width == 1:
        mask = np.zeros((snap.rows, snap.g_ok.shape[1]), dtype=np.bool_)
        claims = np.zeros(mask.shape, dtype=np.int64)
        r_arr, s_arr = np.array(rows, dtype=np.int64), np.array([s[0] for s in slots], dtype=np.int64)
        mask[r_arr, s_arr] = True
        if int(np.count_nonzero(mask)) != len(candidates):
            return None  # duplicates
        claims[r_arr, s_arr] = [c.vram_claims[0] for c in candidates]
        batch = GpuBatch(mask=mask, claims=claims, ram_claim=first.ram_claim, count=len(candidates),
                         cpu_claim=first.cpu_claim)
        scored = _score_batch(ctx, batch)
        if scored is None:
            return None
        r, s, total, breakdown = scored
        by_position = {(row, ss[0]): c for row, ss, c in zip(rows, slots, candidates, strict=True)}
        return by_position[(r, s)], total, breakdown
    if len(set(rows)) != len(rows):
        return None  # several sets on one worker: the reference path ranks them
    sets = GpuSetBatch(
        rows=np.array(rows, dtype=np.int64),
        slots=np.array(slots, dtype=np.int64),
        indexes=np.array([c.gpu_indexes for c in candidates], dtype=np.int64),
        claims=np.array([c.vram_claims for c in candidates], dtype=np.int64),
        ram_claim=first.ram_claim,
        cpu_claim=first.cpu_claim,
    )
    if any(list(c.gpu_indexes) != sorted(c.gpu_indexes) for c in candidates):
        return None
    picked = _score_sets(ctx, sets)
    if picked is None:
        return None
    best, total, breakdown = picked
    return candidates[best], total, breakdown


def run_scoring(
    snapshot: ClusterSnapshot,
    model: ModelSpec,
    candidates: Sequence[Candidate],
    profile: Profile = DEFAULT_PROFILE,
    *,
    filters: Sequence[FilterReport] = (),
) -> Decision:
    """Score ``candidates`` with the profile's scorers and pick the best (ties: worker name, GPU indexes)."""
    if not candidates:
        raise ValueError("run_scoring needs at least one candidate")
    ctx = PlacementContext(snapshot=snapshot, model=model, profile=profile)
    scored = _score_candidates_fast(ctx, candidates)
    if scored is None:
        ordered = sorted(candidates, key=_candidate_key)
        best, total, breakdown = _score_reference(ctx, ordered)
        scored = (ordered[best], total, breakdown)
    return decision(model, scored, tuple(filters), len(candidates))


# ------------------------------------------------------------------------------------------- fast path


@dataclass(frozen=True)
class GpuFit:
    """Fitting's winning single-GPU candidates in the snapshot's ``[row, slot]`` layout (see ``fit_gpus``)."""

    strategy: str
    batch: GpuBatch


def fit_gpus(
    snapshot: ClusterSnapshot,
    model: ModelSpec,
    request: ResourceRequest,
    survivors: Sequence[str],
    profile: Profile = DEFAULT_PROFILE,
) -> GpuFit | None:
    """The candidates ``run_fitting`` would return, kept as a ``[row, slot]`` batch, when the winning strategy
    yields single-GPU ones; None otherwise (nothing fits, or another shape: ``run_fitting`` then gives the
    candidates or the explanation). No ``Candidate`` is built: that is what makes it fast."""
    ctx = PlacementContext(snapshot=snapshot, model=model, profile=profile, request=request)
    fitted = _fit(ctx, _mask(snapshot, survivors), False)
    if not isinstance(fitted.batch, GpuBatch) or len(fitted.batch) == 0:
        return None
    return GpuFit(strategy=fitted.strategy or "", batch=fitted.batch)


def score_gpus(
    snapshot: ClusterSnapshot, model: ModelSpec, fit: GpuFit, profile: Profile = DEFAULT_PROFILE
) -> Decision | None:
    """Pick one of single-GPU candidates: the decision ``run_scoring`` makes on the same candidates.

    None when the batch is empty or a configured scorer has no vectorised form (use ``run_scoring``).
    """
    batch = fit.batch
    if len(batch) == 0:
        return None
    ctx = PlacementContext(snapshot=snapshot, model=model, profile=profile)
    scored = _score_batch(ctx, batch)
    return None if scored is None else gpu_decision(snapshot, model, batch, fit.strategy, scored)


# ------------------------------------------------------------------------------------------- place


def requirements(
    model: ModelSpec, arch: ModelArch | None = None, gguf: GgufSpec | None = None
) -> ResourceRequest | Reason:
    """The replica's resource request, or why it cannot be estimated (see ``requirements.estimate``)."""
    return estimate(model, arch, gguf)


def place(
    snapshot: ClusterSnapshot,
    model: ModelSpec,
    now: float,
    profile: Profile = DEFAULT_PROFILE,
    *,
    request: ResourceRequest | None = None,
    arch: ModelArch | None = None,
    gguf: GgufSpec | None = None,
    exhaustive: bool = False,
) -> Decision | Unschedulable:
    """Place one replica: estimate, filter, fit and score; a Decision or an explained Unschedulable."""
    if request is None:
        estimated = estimate(model, arch, gguf)
        if isinstance(estimated, Reason):
            return Unschedulable(model=model.name, message=estimated.message, reasons=(estimated,))
        request = estimated
    ctx = PlacementContext(snapshot=snapshot, model=model, profile=profile, now=now, request=request)
    if exhaustive:
        names, reports = _filter_reference(ctx)
        survivors = _mask(snapshot, names)
    else:
        survivors, reports = _filter_fast(ctx)
    if not survivors.any():
        return Unschedulable.of(model.name, filters_message(reports), filters=reports)
    fitted = _fit(ctx, survivors, exhaustive)
    if not fitted.found:
        return Unschedulable.of(model.name, unfit_message(ctx, survivors), filters=reports, reasons=fitted.reasons)
    scored = _pick_fast(ctx, fitted)
    considered = len(fitted.batch) if fitted.batch is not None else len(fitted.candidates)
    if scored is None:
        if fitted.batch is not None:
            fitted.candidates = _batch_candidates(ctx, fitted.batch, fitted.strategy or "")
        best, total, breakdown = _score_reference(ctx, fitted.candidates)
        scored = (fitted.candidates[best], total, breakdown)
    return decision(model, scored, tuple(reports), considered)


def _pick_fast(ctx: PlacementContext, fitted: _Fitted) -> Scored | None:
    """The best candidate of a fast-path batch, or None when a scorer lacks the fast form."""
    snap, strategy = ctx.snapshot, fitted.strategy or ""
    if isinstance(fitted.batch, RowBatch):
        rows = _score_sets(ctx, fitted.batch)
        if rows is None:
            return None
        best, total, breakdown = rows
        layers = fitted.batch.total_layers
        chosen = Candidate(
            worker=snap.name_of(int(fitted.batch.rows[best])), gpu_indexes=(), vram_claims=(),
            ram_claim=fitted.batch.ram_claim, strategy=strategy, total_layers=layers,
            offload_layers=0 if layers is not None else None, cpu_claim=fitted.batch.cpu_claim,
        )
        return chosen, total, breakdown
    if isinstance(fitted.batch, GpuSetBatch):
        sets = _score_sets(ctx, fitted.batch)
        if sets is None:
            return None
        best, total, breakdown = sets
        chosen = Candidate(
            worker=snap.name_of(int(fitted.batch.rows[best])),
            gpu_indexes=tuple(fitted.batch.indexes[best].tolist()),
            vram_claims=tuple(fitted.batch.claims[best].tolist()),
            ram_claim=fitted.batch.ram_claim,
            strategy=strategy,
            cpu_claim=fitted.batch.cpu_claim,
        )
        return chosen, total, breakdown
    if fitted.batch is None:
        return None
    single = _score_batch(ctx, fitted.batch)
    if single is None:
        return None
    r, s, total, breakdown = single
    return gpu_candidate(snap, fitted.batch, r, s, strategy), total, breakdown


# ------------------------------------------------------------------------------------------- scale-down


def scale_down_order(
    snapshot: ClusterSnapshot,
    model: ModelSpec,
    now: float,
    profile: Profile = DEFAULT_PROFILE,
    instances: Sequence[Instance] | None = None,
) -> tuple[ScaleDownEntry, ...]:
    """Instances of ``model`` ranked for removal, lowest keep-score first.

    Defaults to the snapshot's instances of the model that are not already DRAINING. Ties go to the newest
    instance first (largest ``created_at``), then by id.
    """
    if instances is None:
        instances = [i for i in snapshot.instances(model.name) if i.state != InstanceState.DRAINING]
    items = sorted(instances, key=lambda i: i.id)
    ctx = PlacementContext(snapshot=snapshot, model=model, profile=profile, now=now)
    parts: list[tuple[str, list[float]]] = []
    for cfg in profile.scale_down_scorers:
        scorer = SCALE_DOWN_SCORERS[cfg.name].configured(cfg.args, "scale-down scorer")
        k = factor(cfg, scorer.max_score)
        parts.append((cfg.name, [raw * k for raw in scorer.score(ctx, items)]))
    entries = []
    for i, inst in enumerate(items):
        total = 0.0
        for _, values in parts:
            total = total + values[i]
        entries.append(
            (quantize(total), -inst.created_at, inst.id,
             ScaleDownEntry(instance_id=inst.id, score=total, breakdown={n: v[i] for n, v in parts}))
        )
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    return tuple(e[3] for e in entries)
