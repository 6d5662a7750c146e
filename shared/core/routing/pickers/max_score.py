"""max-score-picker (GIE): the highest total wins; ties are broken at random (a seeded RNG, so a replayed
run decides the same way), and with ``max_endpoints = k`` the top k in score order are the fallback list.

Random ties matter: under a burst every request sees the same stale scores, and a fixed tie order piles
them on one endpoint (llm-d-router PR #2515 notes the opposite trade-off for reproducibility).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from shared.core.routing.cycle import Cycle
from shared.core.routing.domain import EndpointState
from shared.core.routing.pickers.common import PickParams, check_pick
from shared.core.routing.plugin import Picker

EPS = 1e-9


class MaxScorePicker(Picker):
    """Best total first, random among equals."""

    type_name = "max-score-picker"
    Params = PickParams

    @classmethod
    def check(cls, params: msgspec.Struct) -> list[str]:
        """``max_endpoints >= 1``."""
        return check_pick(params)

    def pick(self, cycle: Cycle, cands: list[EndpointState], totals: Sequence[float]) -> list[int]:
        """Indexes by descending total, ties shuffled."""
        assert isinstance(self.params, PickParams)
        k = self.params.max_endpoints
        n = len(totals)
        if n == 0:
            return []
        floor = max(totals) - EPS
        if k == 1:
            ties = [i for i, t in enumerate(totals) if t >= floor]
            return [ties[cycle.rng.randrange(len(ties))] if len(ties) > 1 else ties[0]]
        # one sort serves both: the ties lead the descending order (sorted(..., reverse=True)[:k] is
        # heapq.nlargest's documented equivalent, and faster for ~100 endpoints)
        order = sorted(range(n), key=totals.__getitem__, reverse=True)
        m = 1
        while m < n and totals[order[m]] >= floor:
            m += 1
        if m > 1:
            ties = sorted(order[:m])  # index order, as the seeded draw expects
            first = ties[cycle.rng.randrange(m)]
        else:
            first = order[0]
        return [first, *[i for i in order[:k] if i != first][: k - 1]]
