"""no-hit-lru-scorer (llm-d): spreads *new* prefixes. For a cold request (no endpoint holds any of its
blocks) endpoints that never took a cold request score 1.0, the others by recency of their last cold
request, linearly from 1 (least recent) down to 0 (most recent); warm requests score a neutral 0.5.
The recency list holds at most ``lru_size`` endpoints (llm-d 1024) and learns only from acted decisions.
"""

from __future__ import annotations

from collections import OrderedDict

import msgspec

from shared.core.routing.cycle import PREFIX_SOURCES, Cycle
from shared.core.routing.domain import EndpointState
from shared.core.routing.plugin import Scorer

NEUTRAL = 0.5


class NoHitParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``lru_size``: endpoints remembered; ``source``: the index that decides "cold"."""

    lru_size: int = 1024
    source: str = "hybrid"


class NoHitLruScorer(Scorer):
    """Cold requests go to the endpoint that least recently took a cold request."""

    type_name = "no-hit-lru-scorer"
    Params = NoHitParams

    def __init__(self, name: str, params: msgspec.Struct) -> None:
        super().__init__(name, params)
        self._recent: OrderedDict[str, None] = OrderedDict()  # least recent first

    @classmethod
    def check(cls, params: msgspec.Struct) -> list[str]:
        """Ranges."""
        assert isinstance(params, NoHitParams)
        out = []
        if params.lru_size < 1:
            out.append(f"lru_size must be >= 1 (got {params.lru_size})")
        if params.source not in PREFIX_SOURCES:
            out.append(f"source must be one of {', '.join(PREFIX_SOURCES)} (got {params.source!r})")
        return out

    def _cold(self, cycle: Cycle) -> bool:
        assert isinstance(self.params, NoHitParams)
        return not cycle.matches(self.params.source)

    def score(self, cycle: Cycle, cands: list[EndpointState]) -> list[float] | None:
        """1 for never-used, else by recency; 0.5 for warm requests (None: the same for all)."""
        if not self._cold(cycle):
            return None
        recent = self._recent
        if not recent:
            return None
        rank = {eid: i for i, eid in enumerate(recent)}  # 0 = least recent
        top = max(len(rank) - 1, 1)
        out = []
        for st in cands:
            r = rank.get(st.id)
            out.append(1.0 if r is None else 1.0 - r / top)
        return out

    def picked(self, cycle: Cycle, endpoint: EndpointState) -> None:
        """A cold request went to ``endpoint``: it becomes the most recent."""
        if not self._cold(cycle):
            return
        assert isinstance(self.params, NoHitParams)
        recent = self._recent
        recent.pop(endpoint.id, None)
        recent[endpoint.id] = None
        while len(recent) > self.params.lru_size:
            recent.popitem(last=False)
