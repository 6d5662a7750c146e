"""Filter plugins, registered by type name (one module each)."""

from __future__ import annotations

from shared.core.routing.filters.draining import DrainingFilter
from shared.core.routing.filters.prefix_affinity import PrefixAffinityFilter
from shared.core.routing.filters.role import RoleFilter
from shared.core.routing.filters.saturation import SaturationFilter
from shared.core.routing.filters.served import ServedFilter
from shared.core.routing.filters.stale import StaleMetricsFilter
from shared.core.routing.plugin import Filter

FILTERS: dict[str, type[Filter]] = {
    cls.type_name: cls
    for cls in (ServedFilter, DrainingFilter, StaleMetricsFilter, SaturationFilter, RoleFilter, PrefixAffinityFilter)
}

__all__ = ["FILTERS", "Filter"]
