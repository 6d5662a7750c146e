"""Scale-down scorer plugins, registered by name (one module each)."""

from __future__ import annotations

from shared.core.placement.scaledown.base import ScaleDownScorer
from shared.core.placement.scaledown.offload_layers import OffloadLayersKeep
from shared.core.placement.scaledown.placement import PlacementKeep
from shared.core.placement.scaledown.status import StatusKeep

SCALE_DOWN_SCORERS: dict[str, type[ScaleDownScorer]] = {
    StatusKeep.name: StatusKeep,
    OffloadLayersKeep.name: OffloadLayersKeep,
    PlacementKeep.name: PlacementKeep,
}

__all__ = ["SCALE_DOWN_SCORERS", "ScaleDownScorer"]
