"""max-score-picker (GIE): the highest total wins; ties are broken at random (a seeded RNG, so a replayed
run decides the same way), and with ``max_endpoints = k`` the top k in score order are the fallback list.

Random ties matter: under a burst every request sees the same stale scores, and a fixed tie order piles
them on one endpoint (llm-d-router PR #2515 notes the opposite trade-off for reproducibility).
"""

from __future__ import annotations

import numpy as np

from shared.core.routing.cycle import Cycle
from shared.core.routing.domain import EndpointState
from shared.core.routing.pickers.common import CountPicker
from shared.core.routing.plugin import Scores

EPS = 1e-9
TOP_BY_ARGMAX = 8  # fallback lists up to this long are found by repeated argmax, longer ones by a sort


class MaxScorePicker(CountPicker):
    """Best total first, random among equals."""

    type_name = "max-score-picker"
    def pick(self, cycle: Cycle, cands: list[EndpointState], totals: Scores) -> list[int]:
        """Indexes by descending total, ties shuffled."""
        k = self.max_endpoints
        t = np.asarray(totals, dtype=np.float64)
        n = len(t)
        if n == 0:
            return []
        top = int(t.argmax())  # the first best (argmax: max() without the reduction's overhead)
        # descending total, equal totals in index order (what sorted(range(n), key=totals.__getitem__,
        # reverse=True) gives), the chosen tie first; argmax returns the first of equal maxima, so k rounds of
        # it on a copy with each winner set to -inf are that order's first k (cheaper than sorting 100)
        order: list[int] | None = None
        if 1 < k <= TOP_BY_ARGMAX and t[t.argmin()] > -np.inf:  # (no NaN, no -inf: argmax rounds are exact)
            c = t.copy()
            c[top] = -np.inf  # the first round's argmax is ``top``, found above
            order = [top]
            for _ in range(min(k, n) - 1):
                i = int(c.argmax())
                order.append(i)
                c[i] = -np.inf
            # the runner-up tells whether the best is tied: usually not, and then the order is the answer
            # (no tie mask, no draw from the RNG, as below when the count of ties is 1)
            if n == 1 or t[order[1]] < t[top] - EPS:
                return order
        ge = t >= t[top] - EPS
        m = int(np.count_nonzero(ge))
        first = int(np.flatnonzero(ge)[cycle.rng.randrange(m)]) if m > 1 else top  # ties in index order
        if k == 1:
            return [first]
        if order is None:
            order = np.argsort(-t, kind="stable")[:k].tolist()
        return [first, *[i for i in order if i != first][: k - 1]]
