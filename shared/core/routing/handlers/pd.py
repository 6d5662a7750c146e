"""pd: prefill/decode disaggregation (llm-d ``disagg-profile-handler`` with ``prefix-based-pd-decider``).

The decode profile always runs. The prefill profile runs too when the request is worth disaggregating:
``prompt_tokens >= min_prompt_tokens`` and the prompt tokens not cached on the chosen decode endpoint are
at least ``non_cached_tokens`` (llm-d: e.g. 512; 0 disables disaggregation). The decode endpoint
receives the request; the prefill endpoint computes its KV cache. If the prefill profile finds no
endpoint the request is served aggregated by the decode endpoint (a prefill is not required).
"""

from __future__ import annotations

import msgspec

from shared.core.routing.cycle import PREFIX_SOURCES, Cycle
from shared.core.routing.domain import EndpointState
from shared.core.routing.handlers.base import Handler, HandlerOutcome
from shared.core.routing.profile import Profile


class PdParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Profile names and the decider's thresholds."""

    decode_profile: str = "decode"
    prefill_profile: str = "prefill"
    non_cached_tokens: int = 512
    min_prompt_tokens: int = 0
    source: str = "hybrid"


class PdHandler(Handler):
    """Decode always; prefill when the uncached prompt is long enough."""

    type_name = "pd"
    Params = PdParams

    @classmethod
    def check(cls, params: msgspec.Struct, profiles: dict[str, Profile]) -> list[str]:
        """Both profiles must exist; thresholds non-negative."""
        assert isinstance(params, PdParams)
        out = [f"no profile named {n!r}" for n in (params.decode_profile, params.prefill_profile) if n not in profiles]
        if params.non_cached_tokens < 0 or params.min_prompt_tokens < 0:
            out.append("non_cached_tokens and min_prompt_tokens must be >= 0")
        if params.source not in PREFIX_SOURCES:
            out.append(f"source must be one of {', '.join(PREFIX_SOURCES)} (got {params.source!r})")
        return out

    def run(self, cycle: Cycle, pool: list[EndpointState], explain: bool) -> HandlerOutcome:
        """Decode result, plus the prefill result when the decider approves."""
        p = self.params
        assert isinstance(p, PdParams)
        decode = self.profiles[p.decode_profile].run(cycle, pool, explain)
        results = {p.decode_profile: decode}
        if not decode.endpoints or p.non_cached_tokens == 0:
            return HandlerOutcome(results, p.decode_profile)
        req = cycle.request
        target = cycle.state.endpoints[decode.endpoints[0]]
        if req.num_prompt_tokens < p.min_prompt_tokens or cycle.uncached_tokens(target, p.source) < p.non_cached_tokens:
            return HandlerOutcome(results, p.decode_profile)
        prefill = self.profiles[p.prefill_profile].run(cycle, pool, explain)
        results[p.prefill_profile] = prefill
        # over mixed endpoints the prefill profile may choose the decode endpoint itself: that is an aggregated
        # request (no prefill leg), not one booked twice on the same endpoint
        split = bool(prefill.endpoints) and prefill.endpoints[0] != decode.endpoints[0]
        return HandlerOutcome(results, p.decode_profile, p.prefill_profile if split else None)
