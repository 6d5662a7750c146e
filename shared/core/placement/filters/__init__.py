"""Filter plugins, registered by name (one module each)."""

from __future__ import annotations

from shared.core.placement.filters.backend import BackendFilter
from shared.core.placement.filters.base import Filter
from shared.core.placement.filters.cluster import ClusterFilter
from shared.core.placement.filters.gpu_selector import GpuSelectorFilter
from shared.core.placement.filters.labels import LabelsFilter
from shared.core.placement.filters.local_path import LocalPathFilter
from shared.core.placement.filters.status import StatusFilter

FILTERS: dict[str, type[Filter]] = {
    ClusterFilter.name: ClusterFilter,
    GpuSelectorFilter.name: GpuSelectorFilter,
    LabelsFilter.name: LabelsFilter,
    StatusFilter.name: StatusFilter,
    BackendFilter.name: BackendFilter,
    LocalPathFilter.name: LocalPathFilter,
}

__all__ = ["FILTERS", "Filter"]
