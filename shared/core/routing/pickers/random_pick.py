"""random-picker (GIE): uniform choice, ignoring scores (a baseline)."""

from __future__ import annotations

import msgspec

from shared.core.routing.cycle import Cycle
from shared.core.routing.domain import EndpointState
from shared.core.routing.pickers.common import PickParams, check_pick
from shared.core.routing.plugin import Picker, Scores


class RandomPicker(Picker):
    """Any endpoint, uniformly."""

    type_name = "random-picker"
    Params = PickParams

    @classmethod
    def check(cls, params: msgspec.Struct) -> list[str]:
        """``max_endpoints >= 1``."""
        return check_pick(params)

    def pick(self, cycle: Cycle, cands: list[EndpointState], totals: Scores) -> list[int]:
        """A random sample of ``max_endpoints`` indexes."""
        assert isinstance(self.params, PickParams)
        return cycle.rng.sample(range(len(totals)), min(self.params.max_endpoints, len(totals)))
