"""Parameters shared by the pickers: how many endpoints to return (the first, then fallbacks)."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import numpy as np

from shared.core.routing.plugin import Picker, Scores


class PickParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``max_endpoints``: length of the answer (GIE ``maxNumOfEndpoints``, default 1); the proxy tries them
    in order, so k > 1 is the top-k fallback list."""

    max_endpoints: int = 1


def check_pick(params: msgspec.Struct) -> list[str]:
    """``max_endpoints >= 1``."""
    assert isinstance(params, PickParams)
    if params.max_endpoints < 1:
        return [f"max_endpoints must be >= 1 (got {params.max_endpoints})"]
    return []


def as_floats(totals: Scores) -> Sequence[float]:
    """Totals as Python floats (a profile hands over an array; scalar arithmetic then stays Python's)."""
    return totals.tolist() if isinstance(totals, np.ndarray) else totals


class CountPicker(Picker):
    """A picker whose only parameter is how many endpoints it returns (every built-in picker)."""

    Params = PickParams

    @classmethod
    def check(cls, params: msgspec.Struct) -> list[str]:
        """``max_endpoints >= 1``."""
        return check_pick(params)

    @property
    def max_endpoints(self) -> int:
        """Length of the answer."""
        p = self.params
        assert isinstance(p, PickParams)
        return p.max_endpoints
