"""The fused one-token-decode loop of ``Scheduler.schedule`` leaves exactly the state the general loop leaves.

Random scenarios (the differential harness's, plus longer decode-heavy ones with several prompts sharing
prefixes and pools small enough to preempt) run through two schedulers side by side, one with
``fused_decode`` on and one with it off; after every step the step outputs, every request's state, the KV
pool (free-list order, hashes, reference counts) and the KV events must be identical.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

from shared.core.engine import Request
from shared.core.engine.kv_cache import KVCache
from shared.core.engine.replay import to_config
from shared.core.engine.scenarios import random_scenario
from shared.core.engine.scheduler import Scheduler, StepOutput

_KV_FIELDS = ("block_hash", "cached", "_dups", "num_free", "ref_cnt")


def _request_state(r: Request) -> tuple[Any, ...]:
    return tuple(getattr(r, f) for f in Request.__slots__ if f != "__weakref__")


def _kv_state(kv: KVCache) -> tuple[Any, ...]:
    return (kv.free_list(), *(getattr(kv, f) for f in _KV_FIELDS))


def _out_state(out: StepOutput) -> tuple[Any, ...]:
    return (out.pairs(), [r.req_id for r in out.sampling], [r.req_id for r in out.preempted], out.num_tokens,
            out.attn_work, out.kv_read, out.lora_loads)


def _requests(seed: int, decode_heavy: bool) -> tuple[Any, list[tuple[int, Request]]]:
    sc = random_scenario(seed)
    cfg = dataclasses.replace(to_config(sc.config), enable_kv_events=True)
    rng = random.Random(seed)
    specs = [(r.arrival_step, r.id, list(r.prompt_token_ids), r.max_tokens, r.priority, r.output_token_ids)
             for r in sc.requests]
    if decode_heavy:  # many long decodes at once: steady steps, block boundaries, a pool that runs dry
        bs = cfg.block_size
        n = rng.randrange(4, 24)
        shared = [rng.randrange(1, 5000) for _ in range(bs * rng.randrange(0, 3))]
        specs = []
        for i in range(n):
            prompt = shared + [rng.randrange(1, 5000) for _ in range(rng.randrange(1, 2 * bs))]
            out = rng.randrange(1, 80)
            specs.append((rng.randrange(0, 30), f"d{i}", prompt, out, rng.randrange(0, 3),
                          [rng.randrange(1, 5000) for _ in range(out)]))
        longest = max(len(p) + m for _, _, p, m, _, _ in specs)
        cfg = dataclasses.replace(
            cfg, max_num_seqs=rng.randrange(n // 2 + 1, n + 2), max_model_len=longest + rng.randrange(0, 8),
            max_num_batched_tokens=max(cfg.max_num_batched_tokens, longest + 8),
            long_prefill_token_threshold=min(cfg.long_prefill_token_threshold, longest),
            num_gpu_blocks=-(-longest // bs) + 1 + rng.randrange(0, n * (longest // bs + 1)))
    reqs = [(step, Request(rid, prompt, max_tokens=m, priority=p, arrival_time=float(step),
                           sampled_token_ids=toks, ignore_eos=True))
            for step, rid, prompt, m, p, toks in specs]
    return cfg, reqs


def _run_side_by_side(seed: int, decode_heavy: bool) -> int:
    """Steps both schedulers to the end, asserting equal state after each; returns the steps run."""
    cfg, _ = _requests(seed, decode_heavy)
    fused, general = Scheduler(cfg), Scheduler(cfg)
    general.fused_decode = False
    pairs = [(_requests(seed, decode_heavy)[1], fused), (_requests(seed, decode_heavy)[1], general)]
    last_arrival = max(step for step, _ in pairs[0][0])
    step = 0
    while step <= last_arrival or fused.has_work() or general.has_work():
        assert step < 5000, "scenario did not finish"
        states = []
        for reqs, s in pairs:
            for arrival, r in reqs:
                if arrival == step:
                    s.add_request(r)
            out = s.schedule(float(step))
            mid = (_out_state(out), _kv_state(s.kv), [_request_state(r) for _, r in reqs])
            finished = s.update_from_output(out, step + 1.0)
            states.append((mid, [r.req_id for r in finished], [r.req_id for r in s.running],
                           _kv_state(s.kv), [_request_state(r) for _, r in reqs], s.take_kv_events(),
                           dataclasses.asdict(s.counters)))
        assert states[0] == states[1], f"seed {seed}: step {step} differs"
        step += 1
    return step


@pytest.mark.parametrize("seed", range(60))
def test_fused_decode_matches_the_general_loop_on_random_scenarios(seed: int) -> None:
    assert _run_side_by_side(seed, decode_heavy=False) > 0


@pytest.mark.parametrize("seed", range(60))
def test_fused_decode_matches_the_general_loop_on_long_decode_scenarios(seed: int) -> None:
    assert _run_side_by_side(seed, decode_heavy=True) > 0


def test_a_steady_decode_step_takes_the_fused_loop_for_every_request() -> None:
    cfg, _ = _requests(0, decode_heavy=True)
    s = Scheduler(dataclasses.replace(cfg, max_num_seqs=4, num_gpu_blocks=64, max_model_len=512,
                                      max_num_batched_tokens=512))
    reqs = [Request(f"r{i}", list(range(i * 100, i * 100 + 20)), max_tokens=50, ignore_eos=True) for i in range(4)]
    for r in reqs:
        s.add_request(r)
    s.update_from_output(s.schedule(0.0), 1.0)  # the prefills
    out = s.schedule(1.0)
    # the fused loop hands out slices of ``running`` (the general loop appends one by one)
    assert out.scheduled == reqs and out.num_scheduled == [1] * 4 and out.sampling == reqs
    assert out.kv_read == out.attn_work == sum(r.num_tokens for r in reqs)
