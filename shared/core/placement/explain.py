"""Best-effort explanations (spec §5): what the replica needs and the best the cluster offers.

Computed from the snapshot's columns over the workers that passed the filters, so the fast and the
reference paths give the same words, and a full cluster is explained without visiting every GPU in Python.
"""

from __future__ import annotations

import numpy as np

from shared.core.placement.context import PlacementContext, gpu_type_matches
from shared.core.placement.domain import FilterReport
from shared.core.placement.fitting.multi_worker import MultiWorker
from shared.core.placement.requirements import gib
from shared.core.placement.snapshot import BoolArray, ClusterSnapshot, IntArray


def filters_message(reports: list[FilterReport] | tuple[FilterReport, ...]) -> str:
    """Why no worker survived the filter chain, with the first drop reasons of the emptying filter."""
    if not reports:
        return "no workers in the cluster"
    counts = ", ".join(f"{r.filter} kept {r.kept} of {r.total}" for r in reports)
    last = next((r for r in reversed(reports) if r.dropped), None)
    detail = ""
    if last is not None:
        shown = "; ".join(f"{d.subject}: {d.message}" for d in last.dropped[:3])
        dropped = max(last.total - last.kept, len(last.dropped))  # a verdict carries the first reasons only
        more = f" (+{dropped - 3} more)" if dropped > 3 else ""
        detail = f" [{last.filter}: {shown}{more}]"
    return f"no worker passed the filters: {counts}{detail}"


def unfit_message(ctx: PlacementContext, survivors: BoolArray) -> str:
    """``needs ≈V GiB VRAM per replica; largest allocatable GPU: …; k of n GPUs have the u% headroom``."""
    snap, req = ctx.snapshot, ctx.req
    rows = snap.rows
    eligible = snap.g_exists[:rows] & survivors[:, None]
    selector = ctx.model.gpu_selector
    if selector is not None and selector.gpu_type:
        codes = [c for c, (v, p) in enumerate(snap.type_names()) if gpu_type_matches(selector.gpu_type, v, p)]
        eligible &= np.isin(snap.g_type[:rows], codes)
    usable = eligible & snap.g_ok[:rows]
    cordoned = int((eligible & ~snap.g_ok[:rows]).sum())
    alloc, total = snap.g_alloc[:rows], snap.g_total[:rows]
    parts = [f"needs ≈{gib(req.vram)} GiB VRAM per replica" + (f" and {gib(req.ram)} GiB RAM" if req.ram else "")]
    if req.gpu_count and req.gpu_count > 1:
        parts[0] += f" over {req.gpu_count} GPUs"
    if usable.any():
        masked = np.where(usable, alloc, np.iinfo(np.int64).min)
        r, s = _first_by_name(snap, masked)
        best, best_total = int(alloc[r, s]), int(total[r, s])
        pct = 100.0 * best / best_total if best_total else 0.0
        where = f"{snap.name_of(r)}/gpu{int(snap.g_index[r, s])}"
        parts.append(f"largest allocatable GPU: {gib(max(best, 0))} GiB ({where}, {pct:.0f}%)")
        n = int(usable.sum())
        u = req.gpu_memory_utilization
        if u > 0:
            headroom = int((usable & (alloc >= (total * u).astype(np.int64))).sum())
            parts.append(f"{headroom} of {n} GPUs have the {u * 100:.0f}% utilization headroom")
        if (req.gpu_count or 1) > 1 or best < req.vram:
            best_worker = _best_worker(ctx, usable)
            if best_worker:
                parts.append(best_worker)
    else:
        parts.append(f"no schedulable GPU on the {int(survivors.sum())} workers that passed the filters")
    if ctx.model.distributed_inference_across_workers and req.gpu_count != 1:
        note = MultiWorker.configured().closest(ctx, [ctx.view(n) for n in snap.names_where(survivors)])
        if note:
            parts.append(note)
    if cordoned:
        parts.append(f"{cordoned} GPUs cordoned")
    if req.ram:
        fits = int((survivors & (snap.w_ram_alloc[:rows] >= req.ram)).sum())
        parts.append(f"{fits} of {int(survivors.sum())} workers have the RAM")
    return "; ".join(parts)


def _best_worker(ctx: PlacementContext, usable: BoolArray) -> str:
    """What the best single worker offers: claimable VRAM at the utilisation, or allocatable VRAM ("" if 0)."""
    snap, req = ctx.snapshot, ctx.req
    rows = snap.rows
    alloc, total = snap.g_alloc[:rows], snap.g_total[:rows]
    u = req.gpu_memory_utilization
    if u > 0:
        claim = (total * u).astype(np.int64)
        offer = np.where(usable & (alloc >= claim), claim, 0)
    else:
        offer = np.where(usable, np.maximum(alloc, 0), 0)
    ordered = -np.sort(-offer, axis=1)
    if req.gpu_count:
        ordered = ordered[:, : req.gpu_count]
    sums = ordered.sum(axis=1)
    w, _ = _first_by_name(snap, sums[:, None])
    if sums[w] <= 0:
        return ""
    n = int((ordered[w] > 0).sum())
    kind = f"claimable at {u * 100:.0f}%" if u > 0 else "allocatable"
    return f"best worker: {gib(int(sums[w]))} GiB {kind} over {n} GPUs ({snap.name_of(w)})"


def _first_by_name(snap: ClusterSnapshot, values: IntArray) -> tuple[int, int]:
    """(row, slot) of the maximum of a [row, slot] matrix; ties go to the first worker name, then GPU index."""
    rows, slots = np.nonzero(values == values.max())
    pick = np.lexsort((snap.g_index[rows, slots] if values.shape[1] > 1 else slots, snap.ranks()[rows]))[0]
    return int(rows[pick]), int(slots[pick])
