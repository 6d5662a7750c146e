"""Seeded random replay scenarios and step-trace comparison, for differential tests against vLLM.

``random_scenario(seed)`` draws a small scenario in ``gantry engine replay``'s schema that exercises
what tends to differ between schedulers: tiny KV pools (preemption, eviction), shared prefixes (prefix
hits, the same content computed twice), both policies, a long-prefill threshold, chunked prefill on and
off, arrivals spread over steps. Scenarios are valid by construction (``parse_scenario`` accepts them)
and depend only on the seed. ``first_divergence`` compares two step traces (the records ``replay``
yields, or the same records taken from another scheduler) field by field.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from shared.core.engine.replay import ConfigSpec, RequestSpec, Scenario

COMPARED = ("scheduled", "preempted", "num_running", "num_waiting", "kv_blocks_used", "finished")


def random_scenario(seed: int) -> Scenario:
    """A valid scenario drawn from ``seed`` (same seed, same scenario, on every platform)."""
    rng = random.Random(seed)
    bs = rng.choice((4, 8, 16))
    chunked = rng.random() < 0.8
    prefixes = [[rng.randrange(1, 5000) for _ in range(rng.randrange(1, 5) * bs)] for _ in range(rng.randrange(1, 4))]
    reqs: list[RequestSpec] = []
    for i in range(rng.randrange(2, 13)):
        prompt = list(rng.choice(prefixes)) if rng.random() < 0.6 else []
        prompt += [rng.randrange(1, 5000) for _ in range(rng.randrange(1, 3 * bs + 1))]
        max_tokens = rng.randrange(1, 31)
        reqs.append(
            RequestSpec(
                id=f"r{i}",
                arrival_step=rng.randrange(0, 21),
                prompt_token_ids=prompt,
                max_tokens=max_tokens,
                priority=rng.randrange(0, 4),
                output_token_ids=[rng.randrange(1, 5000) for _ in range(max_tokens)],
            )
        )
    longest = max(len(r.prompt_token_ids) + r.max_tokens for r in reqs)
    max_model_len = longest + rng.randrange(1, 17)
    blocks_longest = -(-max_model_len // bs)
    budget = rng.choice((16, 32, 64, 128, 256, 512))
    if not chunked:
        budget = max(budget, max_model_len)
    thr = min(rng.choice((0, 0, 8, 16, 64)), max_model_len)  # vLLM refuses a threshold above max_model_len
    config = ConfigSpec(
        block_size=bs,
        num_gpu_blocks=blocks_longest + 1 + rng.randrange(0, 3 * blocks_longest),
        max_num_seqs=rng.randrange(1, 9),
        max_num_batched_tokens=budget,
        enable_prefix_caching=rng.random() < 0.7,
        policy="priority" if rng.random() < 0.4 else "fcfs",
        long_prefill_token_threshold=thr,
        enable_chunked_prefill=chunked,
        max_model_len=max_model_len,
    )
    return Scenario(config=config, requests=reqs)


@dataclass(frozen=True, slots=True)
class Divergence:
    """Where two step traces first differ."""

    step: int
    field: str
    ours: Any
    theirs: Any

    def describe(self) -> str:
        """One line: step, field, both values."""
        return f"step {self.step}: {self.field} is {self.ours!r} here, {self.theirs!r} in the reference"


def _norm(field: str, value: Any) -> Any:
    # finished and preempted requests in one step are sets: their order carries no meaning
    if field in ("finished", "preempted"):
        return sorted(value)
    return value


def first_divergence(ours: Iterable[dict[str, Any]], theirs: Iterable[dict[str, Any]]) -> Divergence | None:
    """The first step and field where two traces differ (a missing step counts), or None if equal."""
    a: Sequence[dict[str, Any]] = list(ours)
    b: Sequence[dict[str, Any]] = list(theirs)
    for k in range(min(len(a), len(b))):
        for field in COMPARED:
            x, y = _norm(field, a[k].get(field)), _norm(field, b[k].get(field))
            if x != y:
                return Divergence(k, field, x, y)
    if len(a) != len(b):
        return Divergence(min(len(a), len(b)), "steps", len(a), len(b))
    return None
