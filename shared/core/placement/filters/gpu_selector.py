"""gpu_selector: with explicit GPU ids keep only their workers; with a GPU type keep workers that have one."""

from __future__ import annotations

import numpy as np

from shared.core.limits import decimal
from shared.core.placement.context import PlacementContext, gpu_type_matches
from shared.core.placement.domain import Worker
from shared.core.placement.filters.base import Filter
from shared.core.placement.snapshot import BoolArray


class GpuSelectorFilter(Filter):
    """Keeps the workers the GPU selector can use."""

    name = "gpu_selector"

    def active(self, ctx: PlacementContext) -> bool:
        """Only when GPU ids or a GPU type are given."""
        selector = ctx.model.gpu_selector
        return selector is not None and bool(selector.gpu_ids or selector.gpu_type)

    def check(self, ctx: PlacementContext, worker: Worker) -> str | None:
        """Drop workers holding no selected GPU / no GPU of the wanted type."""
        selector = ctx.model.gpu_selector
        if selector is None:
            return None
        if selector.gpu_ids and worker.name not in {w for w, _ in ctx.selected_ids}:
            return "holds none of the selected GPUs"
        if selector.gpu_type and not any(
            gpu_type_matches(selector.gpu_type, g.vendor, g.product) for g in worker.gpus
        ):
            return f"has no {selector.gpu_type} GPU"
        return None

    def keep_mask(self, ctx: PlacementContext) -> BoolArray:
        """Rows of selected workers, and rows with a GPU of a matching type code."""
        snap = ctx.snapshot
        selector = ctx.model.gpu_selector
        mask = snap.w_present[: snap.rows].copy()
        if selector is None:
            return mask
        if selector.gpu_ids:
            chosen = np.zeros(snap.rows, dtype=np.bool_)
            for name, _ in ctx.selected_ids:
                row = snap.row_of(name)
                if row is not None:
                    chosen[row] = True
            mask &= chosen
        if selector.gpu_type:
            wanted = selector.gpu_type
            codes = [c for c, (v, p) in enumerate(snap.type_names()) if gpu_type_matches(wanted, v, p)]
            rows = snap.rows
            has = (np.isin(snap.g_type[:rows], codes) & snap.g_exists[:rows]).any(axis=1)
            mask &= has
        return mask

    @staticmethod
    def missing(ctx: PlacementContext) -> list[str]:
        """Selected GPU ids whose worker or GPU the cluster does not have."""
        selector = ctx.model.gpu_selector
        raw = selector.gpu_ids if selector is not None else ()
        out = [g for g in raw if not g.rpartition(":")[0] or not decimal(g.rpartition(":")[2])]
        for name, index in ctx.selected_ids:
            worker = ctx.snapshot.worker(name)
            if worker is None or all(g.index != index for g in worker.gpus):
                out.append(f"{name}:{index}")
        return out
