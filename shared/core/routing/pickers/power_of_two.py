"""power-of-two-picker: sample two endpoints at random, keep the better total (Mitzenmacher's "power of
two choices"; SGLang/AIBrix ``power_of_two``). With a load scorer it is the classic least-of-two; the
rest follow by score as fallbacks.
"""

from __future__ import annotations

from shared.core.routing.cycle import Cycle
from shared.core.routing.domain import EndpointState
from shared.core.routing.pickers.common import CountPicker, as_floats
from shared.core.routing.plugin import Scores


class PowerOfTwoPicker(CountPicker):
    """Best of two random endpoints."""

    type_name = "power-of-two-picker"
    def pick(self, cycle: Cycle, cands: list[EndpointState], totals: Scores) -> list[int]:
        """The better of two random indexes (ties: the first drawn), then the rest by score."""
        totals = as_floats(totals)
        n = len(totals)
        if n == 1:
            return [0]
        a, b = cycle.rng.sample(range(n), 2)
        first = b if totals[b] > totals[a] else a
        k = self.max_endpoints
        if k == 1:
            return [first]
        rest = sorted((i for i in range(n) if i != first), key=lambda i: -totals[i])
        return [first, *rest[: k - 1]]
