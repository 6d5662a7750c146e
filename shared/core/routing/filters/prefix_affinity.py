"""prefix-affinity-filter: "sticky until saturated" (llm-d router 2026 default, GIE ``prefix-cache-affinity-filter``).

Keeps only the endpoints whose prefix score (matched blocks / prompt blocks) is at least ``threshold``
(0.80); when none reaches it, keeps all. The load gate opens all endpoints again when the best sticky
endpoint's estimated TTFT exceeds the best non-sticky one's by more than ``max_ttft_penalty_s`` (llm-d
18 s; GIE 5 s). The TTFT estimate is llm-d's ``in-flight uncached tokens / peak prefill throughput``
plus this request's own uncached tokens there (the lookahead of the token-load scorer), with the peak
prefill throughput taken from each endpoint's own GPU step-time model when placement gave one (llm-d
uses one calibrated constant, 15,928 tok/s, for the whole pool; a heterogeneous pool needs one each).
``exploration_probability`` skips the gate at random (GIE 0.01, llm-d 0).
"""

from __future__ import annotations

import msgspec
import numpy as np

from shared.core.routing.cycle import PREFIX_SOURCES, Cycle
from shared.core.routing.domain import EndpointState
from shared.core.routing.plugin import Filter


class AffinityParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Gate settings (defaults: llm-d router, Aug 2026)."""

    threshold: float = 0.8
    max_ttft_penalty_s: float = 18.0
    exploration_probability: float = 0.0
    source: str = "hybrid"  # approximate | precise | hybrid


def estimated_ttft(cycle: Cycle, st: EndpointState, source: str) -> float:
    """Seconds to prefill what is queued on ``st`` plus this request's uncached tokens there."""
    return (st.inflight_tokens + cycle.uncached_tokens(st, source)) / st.prefill_rate


def _best_cold(cycle: Cycle, cands: list[EndpointState], source: str, need: float) -> float | None:
    """The least ``estimated_ttft`` among the candidates holding less than ``need`` blocks of the prompt, every
    estimate at once from the pool's columns (None when ``cands`` is not a sub-list of the pool)."""
    tokens, peak = cycle.column(cands, "tokens"), cycle.column(cands, "prefill")
    if tokens is None or peak is None:
        return None
    idx, blocks = cycle.holders(cands, source)
    matched = np.zeros(len(cands))
    matched[idx] = blocks
    prompt = cycle.request.num_prompt_tokens
    uncached = prompt - np.minimum(matched * cycle.state.config.block_size, prompt)
    est = (tokens + uncached) / peak
    return float(est[matched < need].min())


class PrefixAffinityFilter(Filter):
    """Sticks a request to endpoints holding most of its prefix, unless they are far busier."""

    type_name = "prefix-affinity-filter"
    Params = AffinityParams

    @classmethod
    def check(cls, params: msgspec.Struct) -> list[str]:
        """Ranges of the gate."""
        assert isinstance(params, AffinityParams)
        out = []
        if not 0 < params.threshold <= 1:
            out.append(f"threshold must be in (0, 1] (got {params.threshold})")
        if not params.max_ttft_penalty_s >= 0:
            out.append(f"max_ttft_penalty_s must be >= 0 (got {params.max_ttft_penalty_s})")
        if not 0 <= params.exploration_probability <= 1:
            out.append(f"exploration_probability must be in [0, 1] (got {params.exploration_probability})")
        if params.source not in PREFIX_SOURCES:
            out.append(f"source must be one of {', '.join(PREFIX_SOURCES)} (got {params.source!r})")
        return out

    def filter(self, cycle: Cycle, cands: list[EndpointState]) -> list[EndpointState]:
        """Sticky endpoints when some exist and are not overloaded, else all."""
        p = self.params
        assert isinstance(p, AffinityParams)
        total = cycle.chain.total
        if total == 0 or len(cands) < 2:
            return cands
        if p.exploration_probability and cycle.rng.random() < p.exploration_probability:
            return cands
        matches = cycle.matches(p.source)
        need = p.threshold * total
        # the matches name only the few endpoints holding some of the prompt: look there, not at every candidate
        held = {slot for slot, blocks in matches.items() if blocks >= need}
        if not held:
            return cands
        sticky = [st for st in cands if st.slot in held]
        if not sticky or len(sticky) == len(cands):
            return cands
        best_sticky = min(estimated_ttft(cycle, st, p.source) for st in sticky)
        best_cold = _best_cold(cycle, cands, p.source, need)
        if best_cold is None:  # not a sub-list of the pool: each endpoint's estimate
            best_cold = min(estimated_ttft(cycle, st, p.source) for st in cands if matches.get(st.slot, 0) < need)
        if best_sticky - best_cold > p.max_ttft_penalty_s:
            return cands
        return sticky

    def why(self, cycle: Cycle) -> str:
        """States the threshold."""
        assert isinstance(self.params, AffinityParams)
        return f"holds less than {self.params.threshold:.0%} of the prompt while others hold more"
