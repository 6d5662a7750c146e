"""local_path: a local-path model with explicit GPUs needs the path on the worker."""

from __future__ import annotations

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Worker
from shared.core.placement.filters.base import Filter


def is_local_path(source: str) -> bool:
    """A filesystem path rather than a hub repo id."""
    return source.startswith(("/", "./", "../", "~", "file:"))


class LocalPathFilter(Filter):
    """Keeps workers that report the model's local path (only with explicitly selected GPUs)."""

    name = "local_path"

    def active(self, ctx: PlacementContext) -> bool:
        """Local-path model with explicit GPU ids."""
        selector = ctx.model.gpu_selector
        return is_local_path(ctx.model.source) and selector is not None and bool(selector.gpu_ids)

    def check(self, ctx: PlacementContext, worker: Worker) -> str | None:
        """Drop workers that do not list the path."""
        if not self.active(ctx) or ctx.model.source in worker.local_paths:
            return None
        return f"local path {ctx.model.source} not present"
