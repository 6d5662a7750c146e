"""labels: every worker-selector label equals the worker's."""

from __future__ import annotations

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Worker
from shared.core.placement.filters.base import Filter


class LabelsFilter(Filter):
    """Keeps workers whose labels satisfy the model's worker selector."""

    name = "labels"

    def active(self, ctx: PlacementContext) -> bool:
        """Only with a non-empty selector."""
        return bool(ctx.model.worker_selector)

    def check(self, ctx: PlacementContext, worker: Worker) -> str | None:
        """Name the first label that does not match."""
        for key, value in sorted(ctx.model.worker_selector.items()):
            have = worker.labels.get(key)
            if have != value:
                shown = "missing" if have is None else f"{have!r}"
                return f"label {key}={value!r} wanted, worker has {shown}"
        return None
