"""What the broker holds and answers: queued requests, output chunks, and the explicit error answers."""

from __future__ import annotations

import enum
import math

import msgspec

from shared.core.limits import MAX_CONTEXT as MAX_TOKENS  # a prompt or answer longer than any model's context
from shared.core.limits import MAX_PRIORITY


class ErrorCode(enum.IntEnum):
    """Why a request was answered without being served (HTTP-like codes, as FastDeploy's 500 for expiry)."""

    EXPIRED = 408  # waited longer than scheduler_ttl in the broker
    REJECTED = 429  # the broker was full (scheduler_max_size)
    INVALID = 400  # malformed request (empty id, negative lengths...)
    DUPLICATE = 409  # the id is already held


class QueuedRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One request as the broker holds it; ``arrival_s`` is when the broker accepted it (TTL counts from it).

    ``origin`` is the node that holds the client connection: results go back there whoever serves it.
    """

    request_id: str
    prompt_len: int
    max_tokens: int
    arrival_s: float
    origin: str = ""
    priority: int = 0

    def problem(self) -> str | None:
        """Why the request cannot be queued, or None. (A Struct built in Python checks no type: a NaN or
        fractional number stored here no longer read back as a request, and the request was lost unanswered.)"""
        if type(self.request_id) is not str or not self.request_id or len(self.request_id) > 256:
            return "request_id must be 1..256 characters"
        if type(self.prompt_len) is not int or not 0 <= self.prompt_len <= MAX_TOKENS:
            return f"prompt_len must be an integer in [0, {MAX_TOKENS}] (got {self.prompt_len!r})"
        if type(self.max_tokens) is not int or not 1 <= self.max_tokens <= MAX_TOKENS:
            return f"max_tokens must be an integer in [1, {MAX_TOKENS}] (got {self.max_tokens!r})"
        if type(self.priority) is not int or not -MAX_PRIORITY <= self.priority < MAX_PRIORITY:
            return f"priority must be a 32-bit integer (got {self.priority!r})"
        if type(self.arrival_s) not in (int, float) or not math.isfinite(self.arrival_s):
            return f"arrival_s must be a finite number (got {self.arrival_s!r})"
        if type(self.origin) is not str or len(self.origin) > 256:
            return "origin must be a string of at most 256 characters"
        return None


class Output(msgspec.Struct, frozen=True, kw_only=True):
    """One chunk of a request's answer: ``seq`` counts chunks from 0; ``finished`` closes the stream.

    An error answer (expired, rejected) is a single finished chunk with ``error_code`` set.
    """

    request_id: str
    seq: int
    num_tokens: int = 0
    finished: bool = False
    error_code: int = 0
    error: str = ""
    served_by: str = ""

    @property
    def failed(self) -> bool:
        """True for an error answer."""
        return self.error_code != 0


def expiry_answer(req: QueuedRequest, now: float, ttl_s: float, node: str = "") -> Output:
    """The explicit answer to a request that waited past the TTL."""
    waited = now - req.arrival_s
    return Output(request_id=req.request_id, seq=0, finished=True, error_code=ErrorCode.EXPIRED,
                  error=f"expired: waited {waited:.3f} s in the queue, scheduler_ttl is {ttl_s:g} s", served_by=node)


def is_expired(req: QueuedRequest, now: float, ttl_s: float) -> bool:
    """True once the request has waited ``ttl_s`` seconds or more."""
    return now - req.arrival_s >= ttl_s


PutAnswer = tuple[str, str | None]  # (request id, None when accepted, else why not): the seed's put_requests answer
