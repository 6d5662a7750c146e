"""Scale-up scorer plugins, registered by name (one module each)."""

from __future__ import annotations

from shared.core.placement.scorers.base import Scorer
from shared.core.placement.scorers.binpack import Binpack
from shared.core.placement.scorers.fragmentation import Fragmentation
from shared.core.placement.scorers.locality import Locality
from shared.core.placement.scorers.placement import Placement
from shared.core.placement.scorers.spread import Spread
from shared.core.placement.scorers.worker_balance import WorkerBalance
from shared.core.placement.scorers.worker_fill import WorkerFill

SCORERS: dict[str, type[Scorer]] = {
    Placement.name: Placement,
    Binpack.name: Binpack,
    Spread.name: Spread,
    Locality.name: Locality,
    WorkerFill.name: WorkerFill,
    WorkerBalance.name: WorkerBalance,
    Fragmentation.name: Fragmentation,
}

__all__ = ["SCORERS", "Scorer"]

