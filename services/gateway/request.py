"""Reading an OpenAI request for the picker: the JSON body and the protocol's headers → a ``RouteRequest``.

Pure (no I/O). Bad input raises :class:`BadRequest` with a one-line reason, answered 400 by the picker.
With a tokenizer, the prompt goes to the core as the token ids the engine will see (the chat rendered with
the emulated engine's template), so its block hashes match the engines' KV events (precise prefix);
without one, as text (approximate index only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from services.gateway.protocol import FAIRNESS_HEADER, PRIORITY_HEADER, SESSION_HEADER
from shared.core.limits import MAX_PRIORITY
from shared.core.routing import RouteRequest

__all__ = ["FAIRNESS_HEADER", "PRIORITY_HEADER", "SESSION_HEADER", "BadRequest", "Tokenize", "parse_request",
           "render_chat", "tokenized"]
MAX_BODY_BYTES = 32 << 20


class BadRequest(ValueError):
    """The request cannot be routed as sent (answered 400)."""


Tokenize = Callable[[str], list[int]]


def render_chat(messages: list[tuple[str, str]]) -> str:
    """A chat as the emulated engine renders it (role markers, then the assistant turn)."""
    return "".join(f"<|{role}|>\n{content}\n" for role, content in messages) + "<|assistant|>\n"


MAX_TOKEN_ID = 1 << 32  # token ids are below this (the pick protocol's bound; no vocabulary comes near it)
MAX_MODEL_CHARS = 512  # a model name is echoed in refusals: a megabyte one must not come back whole


def _token_ids(prompt: list[Any]) -> list[int] | None:
    """A completions prompt given as token ids (``[ids]`` or ``[[ids]]``, as the engines accept), or None when it
    is not one; raises BadRequest for ids no tokenizer makes."""
    one = prompt[0] if len(prompt) == 1 and isinstance(prompt[0], list) else prompt
    if not one or not all(type(t) is int for t in one):  # bool is an int subclass, and no token id
        return None
    if not all(0 <= t < MAX_TOKEN_ID for t in one):
        raise BadRequest(f"prompt token ids must be integers in [0, {MAX_TOKEN_ID})")
    return one


def _prompt_text(body: Mapping[str, Any]) -> str | list[int]:
    """The prompt as text: ``prompt`` (completions) or the chat rendered with the engine's template; a
    completions prompt of token ids as those ids (they were routed as an empty prompt)."""
    if "messages" in body:
        msgs = body["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest("'messages' must be a non-empty list")
        parts: list[tuple[str, str]] = []
        for m in msgs:
            if not isinstance(m, dict):
                raise BadRequest("each message must be an object")
            content = m.get("content") or ""
            if isinstance(content, list):  # content parts: keep the text ones
                content = "".join(str(p.get("text", "")) for p in content
                                  if isinstance(p, dict) and p.get("type", "text") == "text")
            if not isinstance(content, str):
                raise BadRequest("message content must be a string or a list of parts")
            parts.append((str(m.get("role", "")), content))
        return render_chat(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        ids = _token_ids(prompt)
        if ids is not None:
            return ids
        prompt = "".join(p for p in prompt if isinstance(p, str))
    if not isinstance(prompt, str):
        raise BadRequest("the body needs 'messages' (chat) or a string 'prompt' (completions)")
    return prompt


def parse_request(request_id: str, body: bytes, headers: Mapping[str, str], tokenize: Tokenize | None = None,
                  tokenize_below: int | None = None) -> tuple[RouteRequest, bool]:
    """The routing request and whether the client asked for a stream; raises BadRequest. A text prompt stays
    text unless ``tokenize`` is given and it is shorter than ``tokenize_below`` characters (any length when
    None): then it is tokenized here, exactly as ``tokenized`` would (a longer one is left to ``tokenized``,
    e.g. on a worker thread)."""
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(f"body too large ({len(body)} bytes > {MAX_BODY_BYTES})")
    try:
        parsed = msgspec.json.decode(body)
    except msgspec.DecodeError as err:
        raise BadRequest(f"body is not JSON: {err}") from None
    except RecursionError:  # nesting deeper than the decoder allows: the client's error, not the picker's
        raise BadRequest("body is not JSON the picker can read: nested too deep") from None
    if not isinstance(parsed, dict):
        raise BadRequest("body must be a JSON object")
    model = parsed.get("model")
    if not isinstance(model, str) or not model or len(model) > MAX_MODEL_CHARS:
        raise BadRequest(f"'model' must be a non-empty string of at most {MAX_MODEL_CHARS} characters")
    prompt = _prompt_text(parsed)
    try:
        priority = int(headers.get(PRIORITY_HEADER, "0"))
    except ValueError:
        raise BadRequest(f"{PRIORITY_HEADER} must be an integer") from None
    if not -MAX_PRIORITY <= priority < MAX_PRIORITY:  # a 4000-digit priority became a band of its own
        raise BadRequest(f"{PRIORITY_HEADER} must lie in [{-MAX_PRIORITY}, {MAX_PRIORITY})")
    max_tokens = parsed.get("max_completion_tokens", parsed.get("max_tokens"))
    # (``type``: a bool is an int, and no length; past a token-id's range it is no length an engine serves)
    expected = max_tokens if type(max_tokens) is int and 0 < max_tokens < MAX_TOKEN_ID else None
    ids, text = (prompt, None) if isinstance(prompt, list) else (None, prompt)
    if tokenize is not None and text and (tokenize_below is None or len(text) < tokenize_below):
        # (one RouteRequest built instead of two: dataclasses.replace on the frozen request cost ~5 us of the
        # ~160 us a check takes in process, and more on the live picker's cold loop)
        ids = tokenize(text) or None
        text = text if ids is None else None
    req = RouteRequest(request_id=request_id, model=model, prompt=text, token_ids=ids,
                       priority=priority,
                       tenant=headers.get(FAIRNESS_HEADER, ""), session=headers.get(SESSION_HEADER),
                       expected_output_tokens=expected)
    return req, bool(parsed.get("stream", False))


def tokenized(req: RouteRequest, tokenize: Tokenize) -> RouteRequest:
    """``req`` with its text prompt replaced by the engines' token ids (unchanged when it has no text, or the
    text yields no tokens)."""
    if not req.prompt:
        return req
    ids = tokenize(req.prompt)
    return dataclasses.replace(req, prompt=None, token_ids=ids) if ids else req
