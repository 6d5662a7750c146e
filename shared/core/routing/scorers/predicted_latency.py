"""predicted-latency-scorer: TTFT predicted from each endpoint's own GPU step-time model.

Gantry placed the replica, so it knows the GPU and parallelism, hence the engine's step-time model
(``shared.core.engine.step_time``). The prediction is::

    rate_e  = B / step_time(B tokens from an empty context)   (peak prefill tokens/s, B = max_num_batched_tokens)
    share_e = 1 − min(running_e, B/2) / B                      (decode tokens take part of each step's budget)
    TTFT_e  = (in-flight uncached tokens_e + this request's uncached tokens_e) / (rate_e × share_e)

and the score ``min_e TTFT_e / TTFT_e`` (1 for the fastest, falling with the ratio). With an SLO
(``request.slo_ttft_s``) endpoints predicted to miss it are halved, so any endpoint that meets it
outranks every one that does not. llm-d's predicted-latency routing uses learned per-pool predictors and
is explicitly unsupported for heterogeneous pools; a per-endpoint model handles an H100 beside an A100.
"""

from __future__ import annotations

import msgspec
import numpy as np
import numpy.typing as npt

from shared.core.routing.cycle import PREFIX_SOURCES, Cycle
from shared.core.routing.domain import EndpointState
from shared.core.routing.plugin import Scorer, Scores

MISS_FACTOR = 0.5


class LatencyParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``source``: prefix index for the uncached-token estimate."""

    source: str = "hybrid"


def ttft(st: EndpointState, uncached: int) -> float:
    """Seconds until a request with ``uncached`` prompt tokens there gets its first token on ``st``
    (``effective_rate`` = rate × share, refreshed by the pool state with each state report)."""
    tokens = st.inflight_tokens + uncached
    return (tokens if tokens > 1 else 1) / st.effective_rate


def predicted_ttft(cycle: Cycle, st: EndpointState, source: str) -> float:
    """Seconds until the request's first token on ``st`` (formula above)."""
    return ttft(st, cycle.uncached_tokens(st, source))


class PredictedLatencyScorer(Scorer):
    """Faster predicted first token, higher score."""

    type_name = "predicted-latency-scorer"
    Params = LatencyParams

    @classmethod
    def check(cls, params: msgspec.Struct) -> list[str]:
        """``source`` must name an index."""
        assert isinstance(params, LatencyParams)
        if params.source not in PREFIX_SOURCES:
            return [f"source must be one of {', '.join(PREFIX_SOURCES)} (got {params.source!r})"]
        return []

    def score(self, cycle: Cycle, cands: list[EndpointState]) -> Scores:
        """``min TTFT / TTFT``, halved where the TTFT SLO would be missed."""
        assert isinstance(self.params, LatencyParams)
        src = self.params.source
        inflight, rate = cycle.load_arrays(cands)
        prompt = cycle.request.num_prompt_tokens
        tokens = inflight + prompt  # uncached = the whole prompt, but where some of it is held:
        idx, blocks = cycle.holders(cands, src)
        if len(idx):
            bs = cycle.state.config.block_size
            held = blocks * bs
            if cycle.chain.total * bs > prompt:  # hashes given with a shorter prompt: never more than all of it
                held = np.minimum(held, prompt)
            tokens[idx] -= held
        # in place on ``tokens`` (a fresh array): the same values as new arrays, two allocations fewer
        ttfts: npt.NDArray[np.float64] = np.maximum(tokens, 1.0, out=tokens)
        ttfts /= rate
        slo = cycle.request.slo_ttft_s
        miss = ttfts > slo if slo is not None else None
        # (argmin: min() without its overhead)
        out: npt.NDArray[np.float64] = np.divide(ttfts[ttfts.argmin()], ttfts, out=ttfts)
        if miss is not None:
            out[miss] *= MISS_FACTOR
        return out
