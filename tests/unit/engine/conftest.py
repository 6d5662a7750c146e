"""Helpers for engine tests: the spec §7 defaults and a hand-driven step loop."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from shared.core.engine import Request, Scheduler, SchedulerConfig, StepOutput


def make_scheduler(**overrides: Any) -> Scheduler:
    """A scheduler with the conformance defaults (spec §7), overridden by keyword."""
    cfg: dict[str, Any] = {
        "max_num_seqs": 16,
        "max_num_batched_tokens": 8192,
        "enable_chunked_prefill": True,
        "enable_prefix_caching": False,
        "num_gpu_blocks": 10_000,
        "block_size": 16,
    }
    cfg.update(overrides)
    return Scheduler(SchedulerConfig(**cfg))


def make_requests(
    n: int, num_tokens: int, *, max_tokens: int = 16, start: int = 0, **kw: Any
) -> list[Request]:
    """Request i has prompt ``[i] * num_tokens`` (as in vLLM's scheduler tests)."""
    return [
        Request(f"r{i}", [i] * num_tokens, max_tokens=max_tokens, arrival_time=float(i), **kw)
        for i in range(start, start + n)
    ]


def counts(out: StepOutput) -> dict[str, int]:
    """Scheduled tokens per request id."""
    return dict(out.pairs())


def run_step(s: Scheduler, now: float = 0.0) -> StepOutput:
    """schedule() then update_from_output() at the same time."""
    out = s.schedule(now)
    s.update_from_output(out, now)
    return out


def ids(reqs: Iterable[Request]) -> list[str]:
    """Request ids in order."""
    return [r.req_id for r in reqs]
