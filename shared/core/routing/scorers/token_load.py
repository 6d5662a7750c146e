"""token-load-scorer (llm-d 2026): ``1 − min(1, tokens / queue_threshold_tokens)`` where ``tokens`` is the
endpoint's in-flight uncached prompt tokens (the router's own accounting) plus this request's uncached
tokens there (the lookahead: the prefill this request would add). Default threshold 4,194,304 tokens.
"""

from __future__ import annotations

import msgspec

from shared.core.routing.cycle import PREFIX_SOURCES, Cycle
from shared.core.routing.domain import EndpointState
from shared.core.routing.plugin import Scorer


class TokenLoadParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``queue_threshold_tokens``: load that scores 0; ``source``: prefix index for the lookahead."""

    queue_threshold_tokens: int = 4_194_304
    source: str = "hybrid"


class TokenLoadScorer(Scorer):
    """Less prefill work waiting (including this request's), higher score."""

    type_name = "token-load-scorer"
    Params = TokenLoadParams

    @classmethod
    def check(cls, params: msgspec.Struct) -> list[str]:
        """Ranges."""
        assert isinstance(params, TokenLoadParams)
        out = []
        if params.queue_threshold_tokens < 1:
            out.append(f"queue_threshold_tokens must be >= 1 (got {params.queue_threshold_tokens})")
        if params.source not in PREFIX_SOURCES:
            out.append(f"source must be one of {', '.join(PREFIX_SOURCES)} (got {params.source!r})")
        return out

    def score(self, cycle: Cycle, cands: list[EndpointState]) -> list[float]:
        """The llm-d formula."""
        p = self.params
        assert isinstance(p, TokenLoadParams)
        inv = 1.0 / p.queue_threshold_tokens
        unc = cycle.uncached_list(cands, p.source)
        return [1.0 - x if (x := (st.inflight_tokens + u) * inv) < 1.0 else 0.0
                for st, u in zip(cands, unc, strict=True)]
