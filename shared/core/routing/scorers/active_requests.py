"""active-request-scorer (llm-d): the router's own in-flight request counts, not scraped metrics.

``count <= idle_threshold`` scores 1; otherwise ``(max − count)/max × max_busy_score`` with ``max`` the
largest count among the candidates (defaults: idle 0, max busy score 1.0).
"""

from __future__ import annotations

import msgspec

from shared.core.routing.cycle import Cycle
from shared.core.routing.domain import EndpointState
from shared.core.routing.plugin import Scorer


class ActiveParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``idle_threshold``: counts at or under it are idle; ``max_busy_score``: ceiling for busy endpoints."""

    idle_threshold: int = 0
    max_busy_score: float = 1.0


class ActiveRequestScorer(Scorer):
    """Fewer requests in flight from this router, higher score."""

    type_name = "active-request-scorer"
    Params = ActiveParams

    @classmethod
    def check(cls, params: msgspec.Struct) -> list[str]:
        """Ranges."""
        assert isinstance(params, ActiveParams)
        out = []
        if params.idle_threshold < 0:
            out.append(f"idle_threshold must be >= 0 (got {params.idle_threshold})")
        if not 0 <= params.max_busy_score <= 1:
            out.append(f"max_busy_score must be in [0, 1] (got {params.max_busy_score})")
        return out

    def score(self, cycle: Cycle, cands: list[EndpointState]) -> list[float] | None:
        """The llm-d formula over in-flight counts."""
        p = self.params
        assert isinstance(p, ActiveParams)
        counts = [st.inflight_requests for st in cands]
        top = max(counts)
        idle, busy = p.idle_threshold, p.max_busy_score
        if top <= 0:
            return None
        return [1.0 if c <= idle else (top - c) / top * busy for c in counts]
