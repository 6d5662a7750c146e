"""backend: the worker has a device type the model's backend runs on (a table in the profile)."""

from __future__ import annotations

import functools

from shared.core.limits import decimal
from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Gpu, Worker
from shared.core.placement.filters.base import Filter
from shared.core.placement.snapshot import SHARED_VENDOR_BIT, BoolArray


class BackendFilter(Filter):
    """Keeps workers with a GPU vendor the backend supports, or CPU when the backend allows it."""

    name = "backend"

    def _supported(self, ctx: PlacementContext) -> tuple[str, ...]:
        return ctx.profile.backend_support.get(str(ctx.model.backend), ())

    def _minimums(self, ctx: PlacementContext) -> dict[str, str]:
        return ctx.profile.min_runtime_version.get(str(ctx.model.backend), {})

    def _runs_on(self, ctx: PlacementContext, gpu: Gpu) -> bool:
        """Vendor supported, and runtime version not below the profile's minimum (unknown versions pass)."""
        if gpu.vendor not in self._supported(ctx):
            return False
        minimum = self._minimums(ctx).get(gpu.vendor)
        return not (minimum and gpu.runtime_version and version_tuple(gpu.runtime_version) < version_tuple(minimum))

    def check(self, ctx: PlacementContext, worker: Worker) -> str | None:
        """CPU counts when the worker has no GPU or the model may offload to CPU."""
        supported = self._supported(ctx)
        if any(self._runs_on(ctx, g) for g in worker.gpus):
            return None
        if "cpu" in supported and (not worker.gpus or ctx.model.cpu_offloading):
            return None
        have = sorted({f"{g.vendor} {g.runtime_version}".strip() for g in worker.gpus}) or ["cpu"]
        want = ", ".join(
            f"{v} ≥ {self._minimums(ctx)[v]}" if v in self._minimums(ctx) else v for v in supported
        ) or "nothing"
        return f"{ctx.model.backend} runs on {want}; worker has {', '.join(have)}"

    def keep_mask(self, ctx: PlacementContext) -> BoolArray:
        """Vendor bitmask per row against the supported vendors' bits."""
        if self._minimums(ctx):
            return super().keep_mask(ctx)  # versions are per GPU: judged by ``check``
        snap = ctx.snapshot
        supported = self._supported(ctx)
        bits = 0
        for vendor in supported:
            bit = snap.vendor_bit(vendor)
            if bit == SHARED_VENDOR_BIT:  # shared with other vendors: the mask cannot tell them apart
                return super().keep_mask(ctx)
            if bit is not None:
                bits |= 1 << bit
        rows = snap.rows
        mask: BoolArray = (snap.w_vendor_bits[:rows] & bits) != 0
        if "cpu" in supported:
            mask = mask | (snap.w_gpus[:rows] == 0) | ctx.model.cpu_offloading
        result: BoolArray = mask & snap.w_present[:rows]
        return result


@functools.lru_cache(maxsize=1024)
def version_tuple(version: str) -> tuple[int, ...]:
    """``"12.1.1"`` → ``(12, 1, 1)``; non-numeric parts count as 0. Cached: a cluster has few distinct versions,
    and a profile with minimum versions parses one per GPU and worker on every filter run."""
    return tuple(int(part) if decimal(part) else 0 for part in version.split("."))
