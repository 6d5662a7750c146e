"""kv-cache-utilization-scorer (GIE): ``1 − kv_usage`` (absolute, not min-max); no metrics scores 0."""

from __future__ import annotations

from shared.core.routing.cycle import Cycle
from shared.core.routing.domain import EndpointState
from shared.core.routing.plugin import Scorer


class KvUtilizationScorer(Scorer):
    """More free KV cache, higher score."""

    type_name = "kv-cache-utilization-scorer"

    def score(self, cycle: Cycle, cands: list[EndpointState]) -> list[float]:
        """``1 − kv_usage`` clamped to [0, 1]."""
        pool = cycle.state.pool(cycle.request.model)
        scores = cycle.state.memo(("kv-free", cycle.request.model), lambda: {
            st: (1.0 - u if 0.0 <= (u := m.kv_usage) <= 1.0 else (0.0 if u > 1.0 else 1.0))
            if (m := st.metrics) is not None else 0.0 for st in pool})
        return list(map(scores.__getitem__, cands))
