"""queue-scorer (GIE): ``(max_q − q)/(max_q − min_q)`` over the candidates' waiting queues; 1 when all equal.

Endpoints without metrics count as the longest queue seen.
"""

from __future__ import annotations

from shared.core.routing.cycle import Cycle
from shared.core.routing.domain import EndpointState
from shared.core.routing.plugin import Scorer, min_max


class QueueScorer(Scorer):
    """Shorter waiting queue, higher score (min-max normalised)."""

    type_name = "queue-scorer"

    def score(self, cycle: Cycle, cands: list[EndpointState]) -> list[float] | None:
        """Min-max of ``waiting``."""
        qs = [m.waiting if (m := st.metrics) is not None else -1 for st in cands]
        worst = max(qs)
        return min_max([q if q >= 0 else worst for q in qs])
