"""Stop checks, applied in the engine's order to the tokens a request will sample.

Order per sampled token (spec §2.3): ``min_tokens`` not reached → continue; EOS (unless ignored) →
stopped; a stop token → stopped with that token as the reason; ``max_tokens`` or ``max_model_len``
reached → length-capped.
"""

from __future__ import annotations

from shared.core.engine.request import FinishReason, Request


def _token_stops(req: Request, tok: int) -> tuple[FinishReason, int | None] | None:
    if not req.ignore_eos and req.eos_token_id is not None and tok == req.eos_token_id:
        return FinishReason.STOP, None
    if tok in req.stop_token_ids:
        return FinishReason.STOP, tok
    return None


def find_stop(req: Request, max_model_len: int) -> tuple[int, FinishReason, int | None]:
    """Output length at which ``req`` stops, why, and the stop token (if a stop token ended it)."""
    limit = min(req.max_tokens, max_model_len - req.prompt_len)
    sampled = req.sampled_token_ids or []
    for k, tok in enumerate(sampled[:limit]):
        length = k + 1
        if length < req.min_tokens:
            continue
        hit = _token_stops(req, tok)
        if hit is not None:
            return length, hit[0], hit[1]
    if len(sampled) < limit:
        # the filler token repeats from here on: it either stops at the first length allowed, or never
        hit = _token_stops(req, req.filler_token)
        at = max(len(sampled) + 1, req.min_tokens)
        if hit is not None and at <= limit:
            return at, hit[0], hit[1]
    return limit, FinishReason.LENGTH, None
