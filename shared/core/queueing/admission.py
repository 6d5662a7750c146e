"""Which leading queued requests an engine can take now: its free KV blocks and token budget.

The estimate is FastDeploy's (prompt only): ``ceil(prompt / block_size) + reserved_output_blocks`` per
request, requests taken in FIFO order until the first that does not fit (head-of-line: nothing behind it
jumps the queue). Without chunked prefill the prompt tokens of a pull are capped by
``max_num_batched_tokens`` (the first request always goes); with it, per-pull quotas of long and of all
partial prefills apply instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shared.core.queueing.request import QueuedRequest


def required_blocks(prompt_len: int, block_size: int) -> int:
    """KV blocks a prompt of ``prompt_len`` tokens fills."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1 (got {block_size})")
    return -(-max(prompt_len, 0) // block_size)


@dataclass(frozen=True, slots=True)
class ChunkedQuota:
    """Per-pull quotas when the engine chunks prefills (FastDeploy's partial-prefill limits)."""

    long_prefill_token_threshold: int
    max_num_partial_prefills: int = 1
    max_long_partial_prefills: int = 1


@dataclass(frozen=True, slots=True)
class PullBudget:
    """What the engine can take now (the seed's ``get_requests`` arguments)."""

    available_blocks: int
    block_size: int
    reserved_output_blocks: int = 2
    max_num_batched_tokens: int = 8192
    batch: int = 1
    chunked: ChunkedQuota | None = None
    total_blocks: int | None = None  # the engine's whole KV cache: a head request past it can never fit

    def problem(self) -> str | None:
        """Why the budget is malformed, or None."""
        if self.block_size < 1:
            return f"block_size must be >= 1 (got {self.block_size})"
        if self.reserved_output_blocks < 0 or self.available_blocks < 0:
            return "available_blocks and reserved_output_blocks must be >= 0"
        if self.max_num_batched_tokens < 1:
            return f"max_num_batched_tokens must be >= 1 (got {self.max_num_batched_tokens})"
        return None

    @property
    def empty(self) -> bool:
        """True when nothing can be taken at all."""
        return self.available_blocks <= self.reserved_output_blocks or self.batch < 1


def admit(queue: Sequence[QueuedRequest], budget: PullBudget) -> int:
    """How many requests at the head of ``queue`` fit ``budget`` (0 when the budget is empty)."""
    problem = budget.problem()
    if problem is not None:
        raise ValueError(problem)
    if budget.empty:
        return 0
    blocks = tokens = long = short = taken = 0
    quota = budget.chunked
    for req in queue[: budget.batch]:
        n = req.prompt_len
        tokens += n
        blocks += required_blocks(n, budget.block_size) + budget.reserved_output_blocks
        if blocks > budget.available_blocks:
            if taken == 0 and budget.total_blocks is not None and blocks > budget.total_blocks:
                # it can never fit: taken, for the engine to refuse (400), rather than hold every request queued
                # behind it until its TTL (all answered 408)
                taken = 1
            break
        if quota is not None:
            if n > quota.long_prefill_token_threshold:
                long += 1
                if long > quota.max_long_partial_prefills:
                    break
            else:
                short += 1
            if long + short > quota.max_num_partial_prefills:
                break
        elif tokens > budget.max_num_batched_tokens and taken > 0:
            break
        taken += 1
    return taken


@dataclass(frozen=True, slots=True)
class PullPlan:
    """What to take from the head of a queue: ``count`` leading entries, of which ``expired`` are answered."""

    count: int
    expired: tuple[int, ...]  # positions (within the taken prefix) of requests past the TTL
    missing: tuple[int, ...] = ()  # positions of ids without a request body (corrupt entries, taken away)


def plan_pull(head: Sequence[QueuedRequest | None], budget: PullBudget, now: float, ttl_s: float) -> PullPlan:
    """The prefix of ``head`` to take: expired requests always (to answer them), the rest by :func:`admit`.

    The prefix ends just before the first live request that does not fit, so nothing jumps the queue.
    """
    live: list[QueuedRequest] = []
    live_pos: list[int] = []
    expired: list[int] = []
    missing: list[int] = []
    for i, req in enumerate(head):
        if req is None:
            missing.append(i)
        elif now - req.arrival_s >= ttl_s:
            expired.append(i)
        else:
            live.append(req)
            live_pos.append(i)
    n = admit(live, budget) if live else 0
    end = live_pos[n] if n < len(live_pos) else len(head)
    return PullPlan(end, tuple(i for i in expired if i < end), tuple(i for i in missing if i < end))
