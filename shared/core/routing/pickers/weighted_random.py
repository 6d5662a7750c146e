"""weighted-random-picker (GIE): A-Res sampling, key ``U^(1/score)``, top k keys; zero scores excluded
unless every score is zero (then uniform). Spreads load in proportion to score instead of always
taking the best (GIE #1411: max-score hot-spots).
"""

from __future__ import annotations

from shared.core.routing.cycle import Cycle
from shared.core.routing.domain import EndpointState
from shared.core.routing.pickers.common import CountPicker, as_floats
from shared.core.routing.plugin import Scores


class WeightedRandomPicker(CountPicker):
    """Random choice weighted by total score."""

    type_name = "weighted-random-picker"
    def pick(self, cycle: Cycle, cands: list[EndpointState], totals: Scores) -> list[int]:
        """A-Res keys, highest first."""
        totals = as_floats(totals)
        rnd = cycle.rng.random
        positive = [i for i, s in enumerate(totals) if s > 0]
        if not positive:
            order = list(range(len(totals)))
            cycle.rng.shuffle(order)
            return order[: self.max_endpoints]
        keyed = sorted(positive, key=lambda i: -(rnd() ** (1.0 / totals[i])))
        return keyed[: self.max_endpoints]
