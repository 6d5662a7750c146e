"""Stop checks, applied in the engine's order to the tokens a request will sample.

Order per sampled token (spec §2.3): ``min_tokens`` not reached → continue; EOS (unless ignored) →
stopped; a stop token → stopped with that token as the reason; ``max_tokens`` or ``max_model_len``
reached → length-capped.
"""

from __future__ import annotations

import contextlib

from shared.core.engine.request import FinishReason, Request

# Up to this many stopping tokens, each is looked for with ``list.index``; more, and one membership test per
# sampled token is cheaper (the two cross between 3 and 4 stopping tokens over 256 to 1,024 sampled tokens).
INDEX_STOPS = 3


def _token_stops(req: Request, tok: int) -> tuple[FinishReason, int | None] | None:
    if not req.ignore_eos and req.eos_token_id is not None and tok == req.eos_token_id:
        return FinishReason.STOP, None
    if tok in req.stop_token_ids:
        return FinishReason.STOP, tok
    return None


def _stopping_tokens(req: Request) -> frozenset[int]:
    """Every token id that ends ``req`` once ``min_tokens`` is reached (what ``_token_stops`` answers for)."""
    if not req.ignore_eos and req.eos_token_id is not None:
        return req.stop_token_ids | {req.eos_token_id}
    return req.stop_token_ids


def find_stop(req: Request, max_model_len: int) -> tuple[int, FinishReason, int | None]:
    """Output length at which ``req`` stops, why, and the stop token (if a stop token ended it)."""
    limit = min(req.max_tokens, max_model_len - req.prompt_len)
    sampled = req.sampled_token_ids or []
    stops = _stopping_tokens(req)
    if stops:
        # the first sampled token at a length >= min_tokens that stops the request, found in C (``list.index``
        # per stopping token) rather than by a Python call per sampled token: a server request pre-samples
        # its whole answer, and with ``ignore_eos`` and no stop tokens there is nothing to look for at all
        first = max(req.min_tokens - 1, 0)
        at = -1
        if len(stops) <= INDEX_STOPS:
            for tok in stops:
                end = limit if at < 0 else at
                if first < end:
                    with contextlib.suppress(ValueError):  # not sampled before ``end``
                        at = sampled.index(tok, first, end)
        else:
            # many stopping tokens (the API takes any number): one scan per token would cost their count times
            # the sampled tokens (50,000 of them over 4,096 tokens: ~2 s of the server's loop); one membership
            # test per sampled token instead, still in C
            with contextlib.suppress(ValueError):  # none sampled in range
                at = first + list(map(stops.__contains__, sampled[first:limit])).index(True)
        if at >= 0:
            hit = _token_stops(req, sampled[at])
            assert hit is not None  # every token in ``stops`` stops the request
            return at + 1, hit[0], hit[1]
    if len(sampled) < limit:
        # the filler token repeats from here on: it either stops at the first length allowed, or never
        hit = _token_stops(req, req.filler_token)
        at = max(len(sampled) + 1, req.min_tokens)
        if hit is not None and at <= limit:
            return at, hit[0], hit[1]
    return limit, FinishReason.LENGTH, None
