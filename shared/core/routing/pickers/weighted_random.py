"""weighted-random-picker (GIE): A-Res sampling, key ``U^(1/score)``, top k keys; zero scores excluded
unless every score is zero (then uniform). Spreads load in proportion to score instead of always
taking the best (GIE #1411: max-score hot-spots).
"""

from __future__ import annotations

import msgspec

from shared.core.routing.cycle import Cycle
from shared.core.routing.domain import EndpointState
from shared.core.routing.pickers.common import PickParams, as_floats, check_pick
from shared.core.routing.plugin import Picker, Scores


class WeightedRandomPicker(Picker):
    """Random choice weighted by total score."""

    type_name = "weighted-random-picker"
    Params = PickParams

    @classmethod
    def check(cls, params: msgspec.Struct) -> list[str]:
        """``max_endpoints >= 1``."""
        return check_pick(params)

    def pick(self, cycle: Cycle, cands: list[EndpointState], totals: Scores) -> list[int]:
        """A-Res keys, highest first."""
        assert isinstance(self.params, PickParams)
        totals = as_floats(totals)
        rnd = cycle.rng.random
        positive = [i for i, s in enumerate(totals) if s > 0]
        if not positive:
            order = list(range(len(totals)))
            cycle.rng.shuffle(order)
            return order[: self.params.max_endpoints]
        keyed = sorted(positive, key=lambda i: -(rnd() ** (1.0 / totals[i])))
        return keyed[: self.params.max_endpoints]
