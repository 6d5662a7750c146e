"""backend: the worker has a device type the model's backend runs on (a table in the profile)."""

from __future__ import annotations

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Worker
from shared.core.placement.filters.base import Filter
from shared.core.placement.snapshot import BoolArray


class BackendFilter(Filter):
    """Keeps workers with a GPU vendor the backend supports, or CPU when the backend allows it."""

    name = "backend"

    def _supported(self, ctx: PlacementContext) -> tuple[str, ...]:
        return ctx.profile.backend_support.get(str(ctx.model.backend), ())

    def check(self, ctx: PlacementContext, worker: Worker) -> str | None:
        """CPU counts when the worker has no GPU or the model may offload to CPU."""
        supported = self._supported(ctx)
        if any(g.vendor in supported for g in worker.gpus):
            return None
        if "cpu" in supported and (not worker.gpus or ctx.model.cpu_offloading):
            return None
        have = sorted({g.vendor for g in worker.gpus}) or ["cpu"]
        want = ", ".join(supported) or "nothing"
        return f"{ctx.model.backend} runs on {want}; worker has {', '.join(have)}"

    def keep_mask(self, ctx: PlacementContext) -> BoolArray:
        """Vendor bitmask per row against the supported vendors' bits."""
        snap = ctx.snapshot
        supported = self._supported(ctx)
        bits = 0
        for vendor in supported:
            code = snap.code("vendor", vendor)
            if code is not None:
                bits |= 1 << code
        rows = snap.rows
        mask: BoolArray = (snap.w_vendor_bits[:rows] & bits) != 0
        if "cpu" in supported:
            mask = mask | (snap.w_gpus[:rows] == 0) | ctx.model.cpu_offloading
        result: BoolArray = mask & snap.w_present[:rows]
        return result
