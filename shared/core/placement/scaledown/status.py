"""status (max 100): healthy replicas are kept; unhealthy or not-yet-running ones go first."""

from __future__ import annotations

from collections.abc import Sequence

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Instance, InstanceState, WorkerState
from shared.core.placement.scaledown.base import ScaleDownScorer


def status_score(ctx: PlacementContext, instance: Instance) -> float:
    """100 READY worker + RUNNING; 0 no worker, worker not READY, or ERROR; otherwise 50."""
    if instance.worker is None or instance.state == InstanceState.ERROR:
        return 0.0
    if ctx.snapshot.state(instance.worker, ctx.now) != WorkerState.READY:
        return 0.0
    return 100.0 if instance.state == InstanceState.RUNNING else 50.0


class StatusKeep(ScaleDownScorer):
    """Instance and worker health."""

    name = "status"
    max_score = 100.0

    def score(self, ctx: PlacementContext, instances: Sequence[Instance]) -> list[float]:
        """Per instance."""
        return [status_score(ctx, i) for i in instances]
