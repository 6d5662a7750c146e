"""random-picker (GIE): uniform choice, ignoring scores (a baseline)."""

from __future__ import annotations

from shared.core.routing.cycle import Cycle
from shared.core.routing.domain import EndpointState
from shared.core.routing.pickers.common import CountPicker
from shared.core.routing.plugin import Scores


class RandomPicker(CountPicker):
    """Any endpoint, uniformly."""

    type_name = "random-picker"
    def pick(self, cycle: Cycle, cands: list[EndpointState], totals: Scores) -> list[int]:
        """A random sample of ``max_endpoints`` indexes."""
        return cycle.rng.sample(range(len(totals)), min(self.max_endpoints, len(totals)))
