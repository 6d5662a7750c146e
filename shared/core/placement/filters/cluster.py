"""cluster: the worker's cluster equals the model's."""

from __future__ import annotations

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Worker
from shared.core.placement.filters.base import Filter
from shared.core.placement.snapshot import BoolArray


class ClusterFilter(Filter):
    """Keeps workers of the model's cluster."""

    name = "cluster"

    def check(self, ctx: PlacementContext, worker: Worker) -> str | None:
        """Drop workers of another cluster."""
        if worker.cluster == ctx.model.cluster:
            return None
        return f"in cluster {worker.cluster!r}, model wants {ctx.model.cluster!r}"

    def keep_mask(self, ctx: PlacementContext) -> BoolArray:
        """Compare cluster codes."""
        snap = ctx.snapshot
        code = snap.code("cluster", ctx.model.cluster)
        column = snap.w_cluster[: snap.rows]
        result: BoolArray = column == (-2 if code is None else code)
        return result
