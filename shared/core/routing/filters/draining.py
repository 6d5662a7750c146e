"""draining-filter: endpoints that announced they are draining (scale-down, upgrade) take no new work."""

from __future__ import annotations

from shared.core.routing.cycle import Cycle
from shared.core.routing.domain import EndpointState
from shared.core.routing.plugin import Filter


class DrainingFilter(Filter):
    """Drops draining endpoints."""

    type_name = "draining-filter"
    reason = "draining"

    def filter(self, cycle: Cycle, cands: list[EndpointState]) -> list[EndpointState]:
        """Keep endpoints whose last report does not say draining."""
        # candidates are a subset of the pool: when no endpoint of the pool drains, nothing to drop
        pool = cycle.state.pool(cycle.request.model)
        flags = cycle.column(pool, "draining")
        if not (flags.any() if flags is not None else any(st.metrics is not None and st.metrics.draining
                                                           for st in pool)):
            return cands
        col = cycle.column(cands, "draining")
        if col is not None:
            return cycle.keep(cands, ~col)
        return [st for st in cands if (m := st.metrics) is None or not m.draining]
