"""running-requests-scorer (GIE 2026 ``running-requests-size-scorer``): min-max on ``num_requests_running``."""

from __future__ import annotations

from shared.core.routing.cycle import Cycle
from shared.core.routing.domain import EndpointState
from shared.core.routing.plugin import Scorer, min_max


class RunningRequestsScorer(Scorer):
    """Fewer running requests, higher score."""

    type_name = "running-requests-scorer"

    def score(self, cycle: Cycle, cands: list[EndpointState]) -> list[float] | None:
        """Min-max of ``running``; endpoints without metrics count as the busiest."""
        rs = [m.running if (m := st.metrics) is not None else -1 for st in cands]
        worst = max(rs)
        return min_max([r if r >= 0 else worst for r in rs])
