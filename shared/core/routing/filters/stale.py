"""stale-metrics-filter: fail closed on endpoints whose state report is missing or too old.

The bound defaults to the data layer's ``staleness_s`` (200 ms, GIE's ``SD_METRICS_STALENESS_THRESHOLD``);
an endpoint that stopped reporting may be dead or wedged, and routing to it on old numbers is how
requests pile up. When every endpoint is stale the request is refused (503), never sent blind.
"""

from __future__ import annotations

import msgspec

from shared.core.routing.cycle import Cycle
from shared.core.routing.domain import EndpointState
from shared.core.routing.plugin import Filter


class StaleParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``max_age_s``: override of the data layer's staleness bound (seconds)."""

    max_age_s: float | None = None


class StaleMetricsFilter(Filter):
    """Drops endpoints without fresh metrics."""

    type_name = "stale-metrics-filter"
    Params = StaleParams

    @classmethod
    def check(cls, params: msgspec.Struct) -> list[str]:
        """``max_age_s`` must be positive."""
        assert isinstance(params, StaleParams)
        if params.max_age_s is not None and not params.max_age_s > 0:
            return [f"max_age_s must be > 0 (got {params.max_age_s})"]
        return []

    def _bound(self, cycle: Cycle) -> float:
        assert isinstance(self.params, StaleParams)
        return self.params.max_age_s if self.params.max_age_s is not None else cycle.state.config.staleness_s

    def filter(self, cycle: Cycle, cands: list[EndpointState]) -> list[EndpointState]:
        """Keep endpoints whose metrics are at most the bound old."""
        oldest = cycle.now - self._bound(cycle)
        # candidates are a subset of the pool: when its oldest report is fresh enough, nothing to drop
        pool = cycle.state.pool(cycle.request.model)
        ts = cycle.column(pool, "ts")  # -inf where no report came
        if ts is not None:
            if len(ts) and ts[ts.argmin()] >= oldest:
                return cands
        elif min((m.ts if (m := st.metrics) is not None else float("-inf") for st in pool),
                 default=float("-inf")) >= oldest:
            return cands
        col = cycle.column(cands, "ts")
        if col is not None:
            return cycle.keep(cands, col >= oldest)
        return [st for st in cands if (m := st.metrics) is not None and m.ts >= oldest]

    def why(self, cycle: Cycle) -> str:
        """States the bound."""
        return f"metrics missing or older than {self._bound(cycle) * 1000:.0f} ms"
