"""status: only READY workers (fresh heartbeat, not cordoned)."""

from __future__ import annotations

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Worker, WorkerState
from shared.core.placement.filters.base import Filter
from shared.core.placement.snapshot import BoolArray


class StatusFilter(Filter):
    """Keeps READY workers; liveness is judged from heartbeat age at the caller's ``now``."""

    name = "status"

    def check(self, ctx: PlacementContext, worker: Worker) -> str | None:
        """Drop NOT_READY and MAINTENANCE workers."""
        state = ctx.snapshot.state(worker.name, ctx.now)
        if state == WorkerState.READY:
            return None
        if state == WorkerState.MAINTENANCE:
            return "MAINTENANCE (cordoned)"
        return f"NOT_READY (last heartbeat {ctx.now - worker.last_heartbeat:.1f}s ago)"

    def keep_mask(self, ctx: PlacementContext) -> BoolArray:
        """Same rule as ``ClusterSnapshot.state``, over the heartbeat column."""
        snap = ctx.snapshot
        rows = snap.rows
        fresh = (ctx.now - snap.w_heartbeat[:rows]) < snap.config.not_ready_after
        result: BoolArray = fresh & ~snap.w_cordoned[:rows] & snap.w_present[:rows]
        return result
