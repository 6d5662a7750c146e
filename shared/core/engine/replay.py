"""Step replay: run a hand-written scenario through the scheduler and report every step.

Input (JSON)::

    {"config": {block_size, num_gpu_blocks, max_num_seqs, max_num_batched_tokens, enable_prefix_caching,
                policy, long_prefill_token_threshold, enable_chunked_prefill, max_model_len?},
     "requests": [{id, arrival_step, prompt_token_ids, max_tokens, priority?, output_token_ids?}]}

Requests arrive at the start of their step, ignore EOS and stop at ``max_tokens``. Each step yields
``{step, scheduled: [[id, n], ...], preempted, num_running, num_waiting, kv_blocks_used, finished}`` where
the counts are taken after scheduling and ``finished`` after the step's output update.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import msgspec

from shared.core.engine.config import SchedulerConfig
from shared.core.engine.request import Request
from shared.core.engine.scheduler import Scheduler

MAX_STEPS = 1_000_000
MAX_REPLAY_BLOCKS = 1 << 20  # KV blocks in a replay's pool (~100 MB of block objects)


class ScenarioError(ValueError):
    """A scenario that cannot be replayed; the message says why, in one line."""


class ConfigSpec(msgspec.Struct, forbid_unknown_fields=True):
    """The ``config`` object of a scenario."""

    block_size: int = 16
    num_gpu_blocks: int = 10_000
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    policy: Literal["fcfs", "priority"] = "fcfs"
    long_prefill_token_threshold: int = 0
    enable_chunked_prefill: bool = True
    max_model_len: int | None = None


class RequestSpec(msgspec.Struct, forbid_unknown_fields=True):
    """One entry of ``requests``."""

    id: str
    arrival_step: int
    prompt_token_ids: list[int]
    max_tokens: int
    priority: int = 0
    output_token_ids: list[int] | None = None


class Scenario(msgspec.Struct, forbid_unknown_fields=True):
    """A whole replay scenario."""

    config: ConfigSpec
    requests: list[RequestSpec]


def parse_scenario(data: bytes | str) -> Scenario:
    """Decode and check a scenario; raises :class:`ScenarioError` with a one-line reason."""
    try:
        sc = msgspec.json.decode(data, type=Scenario)
    except msgspec.DecodeError as err:
        raise ScenarioError(f"invalid scenario: {err}") from None
    cfg = to_config(sc.config)
    problems = cfg.problems()
    if cfg.num_gpu_blocks > MAX_REPLAY_BLOCKS:  # the pool is built block by block: bound its memory
        problems.append(f"num_gpu_blocks must be <= {MAX_REPLAY_BLOCKS} (got {cfg.num_gpu_blocks})")
    if problems:
        raise ScenarioError("invalid config: " + "; ".join(problems))
    seen: set[str] = set()
    usable = cfg.num_gpu_blocks - 1
    for r in sc.requests:
        where = f"request {r.id!r}"
        if r.id in seen:
            raise ScenarioError(f"{where}: duplicate id")
        seen.add(r.id)
        if not 0 <= r.arrival_step < MAX_STEPS:  # a later one would step through empty steps, then fail
            raise ScenarioError(f"{where}: arrival_step must be between 0 and {MAX_STEPS - 1}")
        if not r.prompt_token_ids:
            raise ScenarioError(f"{where}: prompt_token_ids is empty")
        if r.max_tokens < 1:
            raise ScenarioError(f"{where}: max_tokens must be >= 1")
        # its prefill chunks and one step a token at the least: arriving later it could not finish, and the replay
        # would print every step up to the limit before saying so
        least = -(-len(r.prompt_token_ids) // cfg.max_num_batched_tokens) + r.max_tokens
        if r.arrival_step + least > MAX_STEPS:
            raise ScenarioError(f"{where}: arriving at step {r.arrival_step} it needs {least} steps at the least, "
                                f"past the replay's {MAX_STEPS}")
        if cfg.max_model_len is not None and len(r.prompt_token_ids) >= cfg.max_model_len:
            raise ScenarioError(f"{where}: prompt does not fit max_model_len {cfg.max_model_len}")
        longest = min(len(r.prompt_token_ids) + r.max_tokens, cfg.model_len_limit)
        if -(-longest // cfg.block_size) > usable:
            raise ScenarioError(
                f"{where}: needs {-(-longest // cfg.block_size)} blocks at full length, the pool has {usable} usable"
            )
        if not cfg.enable_chunked_prefill and longest > cfg.max_num_batched_tokens:
            raise ScenarioError(
                f"{where}: with chunked prefill off its {longest} tokens (after preemption) never fit "
                f"max_num_batched_tokens {cfg.max_num_batched_tokens}"
            )
    return sc


def to_config(spec: ConfigSpec) -> SchedulerConfig:
    """The scheduler config a scenario asks for."""
    return SchedulerConfig(**msgspec.structs.asdict(spec))


def replay(sc: Scenario) -> Iterator[dict[str, Any]]:
    """Run ``sc`` step by step, yielding one record per step until every request has finished."""
    sched = Scheduler(to_config(sc.config))
    by_step: dict[int, list[RequestSpec]] = {}
    for r in sc.requests:
        by_step.setdefault(r.arrival_step, []).append(r)
    last_arrival = max(by_step, default=-1)
    step = 0
    while step <= last_arrival or sched.has_work():
        if step >= MAX_STEPS:
            raise ScenarioError(f"scenario did not finish within {MAX_STEPS} steps")
        for spec in by_step.get(step, ()):
            sched.add_request(
                Request(
                    spec.id,
                    spec.prompt_token_ids,
                    max_tokens=spec.max_tokens,
                    priority=spec.priority,
                    arrival_time=float(step),
                    sampled_token_ids=spec.output_token_ids,
                    ignore_eos=True,
                )
            )
        out = sched.schedule(float(step))
        record: dict[str, Any] = {
            "step": step,
            "scheduled": [[rid, n] for rid, n in out.pairs()],
            "preempted": [r.req_id for r in out.preempted],
            "num_running": len(sched.running),
            "num_waiting": sched.num_waiting,
            "kv_blocks_used": sched.kv.num_used,
        }
        finished = sched.update_from_output(out, float(step) + 1.0)
        record["finished"] = [r.req_id for r in finished]
        yield record
        step += 1
