"""Plugin interfaces (filter → scorer → picker) and typed parameters.

Each plugin declares its parameters as a msgspec ``Params`` struct; a profile's YAML parameters are
converted into it when the profile loads (unknown or mistyped fields are an error naming the plugin),
then ``check`` adds range checks. Interfaces follow GIE proposal 0845: filters drop endpoints, scorers
give each remaining endpoint a value in [0, 1] combined by un-normalised weights, one picker chooses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, TypeAlias

import msgspec
import numpy as np
import numpy.typing as npt

from shared.core.routing.cycle import Cycle
from shared.core.routing.domain import NO_ENDPOINT, EndpointState

Scores: TypeAlias = Sequence[float] | npt.NDArray[np.float64]
"""One value per candidate: a list, or a float array (what the column-reading scorers return)."""


class NoParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A plugin without parameters."""


class Plugin(ABC):
    """A named, configured plugin instance."""

    type_name: ClassVar[str]
    Params: ClassVar[type[msgspec.Struct]] = NoParams

    def __init__(self, name: str, params: msgspec.Struct) -> None:
        self.name = name
        self.params = params

    @classmethod
    def check(cls, params: msgspec.Struct) -> list[str]:
        """Range problems of ``params`` (types are already checked)."""
        return []

    def picked(self, cycle: Cycle, endpoint: EndpointState) -> None:  # noqa: B027 (optional hook)
        """Called once per acted-on decision of a profile holding this plugin (stateful plugins learn here)."""


class Filter(Plugin):
    """Keeps the endpoints a request may go to; ``reason`` says why the others were dropped."""

    reason: str = ""
    refusal_code: ClassVar[int] = NO_ENDPOINT  # the answer when this filter leaves no endpoint

    @abstractmethod
    def filter(self, cycle: Cycle, cands: list[EndpointState]) -> list[EndpointState]:
        """The kept endpoints, in input order."""

    def why(self, cycle: Cycle) -> str:
        """One line on why endpoints were dropped for this request."""
        return self.reason or self.type_name


class Scorer(Plugin):
    """Rates endpoints in [0, 1]; higher is better."""

    # True when the formula cannot leave [0, 1] nor give NaN (``test_every_scorer_stays_within_0_and_1`` checks
    # every registered scorer), so a profile adds its scores without the clamp pass; others are clamped
    bounded: ClassVar[bool] = False

    @abstractmethod
    def score(self, cycle: Cycle, cands: list[EndpointState]) -> Scores | None:
        """One score per endpoint, aligned with ``cands``; None when every endpoint scores the same (the
        scorer cannot tell them apart for this request, so it adds nothing to the ranking)."""


class Picker(Plugin):
    """Chooses from scored endpoints; returns candidate indexes in preference order."""

    @abstractmethod
    def pick(self, cycle: Cycle, cands: list[EndpointState], totals: Scores) -> list[int]:
        """Indexes into ``cands`` (at least one when ``cands`` is not empty)."""


def min_max(values: Sequence[float]) -> list[float] | None:
    """``(max − v)/(max − min)``: 1 for the lowest value, 0 for the highest; all equal (GIE: all 1) is None."""
    lo, hi = min(values), max(values)
    if hi <= lo:
        return None
    inv = 1.0 / (hi - lo)
    return [(hi - v) * inv for v in values]
