"""queue-scorer (GIE): ``(max_q − q)/(max_q − min_q)`` over the candidates' waiting queues; 1 when all equal.

Endpoints without metrics count as the longest queue seen.
"""

from __future__ import annotations

import numpy as np

from shared.core.routing.cycle import Cycle
from shared.core.routing.domain import EndpointState
from shared.core.routing.plugin import Scorer, Scores, min_max


class QueueScorer(Scorer):
    """Shorter waiting queue, higher score (min-max normalised)."""

    type_name = "queue-scorer"
    bounded = True  # min-max

    def score(self, cycle: Cycle, cands: list[EndpointState]) -> Scores | None:
        """Min-max of ``waiting``."""
        pool = cycle.state.pool(cycle.request.model)
        waiting = cycle.state.memo(("waiting", cycle.request.model), lambda: {
            st: (m.waiting if (m := st.metrics) is not None else -1) for st in pool})
        if cands is pool:  # nothing filtered: the normalised scores depend on the reports only
            return cycle.state.memo(("queue-score", cycle.request.model), lambda: _array(
                min_max(_with_worst(list(map(waiting.__getitem__, pool))))))
        return min_max(_with_worst(list(map(waiting.__getitem__, cands))))


def _array(scores: list[float] | None) -> Scores | None:
    """A memoised score list as a read-only array (the profile adds it to its totals without a conversion)."""
    if scores is None:
        return None
    out = np.array(scores, dtype=np.float64)
    out.flags.writeable = False
    return out


def _with_worst(qs: list[int]) -> list[int]:
    """Endpoints without metrics (-1) count as the longest queue seen."""
    if min(qs) >= 0:
        return qs
    worst = max(qs)
    return [q if q >= 0 else worst for q in qs]
