"""queue-scorer (GIE): ``(max_q − q)/(max_q − min_q)`` over the candidates' waiting queues; 1 when all equal.

Endpoints without metrics count as the longest queue seen.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from shared.core.routing.cycle import Cycle
from shared.core.routing.domain import EndpointState
from shared.core.routing.plugin import Scorer, Scores, min_max


class QueueScorer(Scorer):
    """Shorter waiting queue, higher score (min-max normalised)."""

    type_name = "queue-scorer"
    bounded = True  # min-max

    def score(self, cycle: Cycle, cands: list[EndpointState]) -> Scores | None:
        """Min-max of ``waiting``."""
        col = cycle.column(cands, "waiting")  # kept by the reports
        if col is not None:
            return _min_max_column(col)
        return min_max(_with_worst([(m.waiting if (m := st.metrics) is not None else -1) for st in cands]))


def _min_max_column(q: npt.NDArray[np.float64]) -> Scores | None:
    """``min_max(_with_worst(q))`` on an array: the same floats, element by element."""
    if len(q) == 0:
        return None
    lo = q[q.argmin()]
    if lo < 0:  # endpoints without metrics count as the longest queue seen
        q = np.where(q < 0, q[q.argmax()], q)
        lo = q[q.argmin()]
    hi = q[q.argmax()]
    if hi <= lo:
        return None
    out: npt.NDArray[np.float64] = (hi - q) * (1.0 / (hi - lo))
    return out


def _with_worst(qs: list[int]) -> list[int]:
    """Endpoints without metrics (-1) count as the longest queue seen."""
    if min(qs) >= 0:
        return qs
    worst = max(qs)
    return [q if q >= 0 else worst for q in qs]
