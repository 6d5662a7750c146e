"""The filter plugin interface: a scalar check (the reference) and an optional vectorised mask."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Worker
from shared.core.placement.plugin_args import Configurable
from shared.core.placement.snapshot import BoolArray


class Filter(Configurable, ABC):
    """Drops workers that cannot host the model for a non-resource reason, saying why."""

    name: ClassVar[str]

    @abstractmethod
    def check(self, ctx: PlacementContext, worker: Worker) -> str | None:
        """None to keep ``worker``, else a one-line reason for dropping it."""

    def active(self, ctx: PlacementContext) -> bool:
        """False when the filter keeps every worker for this model (it is then not run per worker)."""
        return True

    def keep_mask(self, ctx: PlacementContext) -> BoolArray:
        """Per snapshot row: keep? Must agree with ``check``; the default simply calls it per worker."""
        snap = ctx.snapshot
        mask = np.zeros(snap.rows, dtype=np.bool_)
        for row in range(snap.rows):
            worker = snap.worker(snap.name_of(row)) if snap.w_present[row] else None
            if worker is not None and self.check(ctx, worker) is None:
                mask[row] = True
        return mask
