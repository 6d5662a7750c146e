"""Property tests: random request mixes and pool sizes never leak blocks or break the budgets."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.core.engine import CalibratedStepTime, Engine, Request, RequestStatus, Scheduler, SchedulerConfig

MODEL = CalibratedStepTime(base_s=0.007, per_token_s=2e-5, per_kv_token_s=1e-7)


@st.composite
def workloads(draw: st.DrawFn) -> tuple[SchedulerConfig, list[dict[str, Any]]]:
    bs = draw(st.sampled_from([1, 2, 4, 16]))
    n = draw(st.integers(1, 24))
    reqs = []
    for i in range(n):
        plen = draw(st.integers(1, 120))
        family = draw(st.integers(0, 3))  # shared prefixes within a family
        reqs.append({
            "id": f"r{i}",
            "prompt": [family] * (plen // 2) + [1000 + i] * (plen - plen // 2),
            "max_tokens": draw(st.integers(1, 40)),
            "priority": draw(st.integers(0, 3)),
            "arrival_step": draw(st.integers(0, 30)),
        })
    need = max(-(-(len(r["prompt"]) + r["max_tokens"]) // bs) for r in reqs)
    cfg = SchedulerConfig(
        block_size=bs,
        num_gpu_blocks=need + 1 + draw(st.integers(0, 3 * need)),
        max_num_seqs=draw(st.integers(1, 8)),
        max_num_batched_tokens=draw(st.integers(8, 256)),
        enable_prefix_caching=draw(st.booleans()),
        policy=draw(st.sampled_from(["fcfs", "priority"])),
        long_prefill_token_threshold=draw(st.sampled_from([0, 0, 16, 50])),
        enable_chunked_prefill=draw(st.booleans()),
    )
    if not cfg.enable_chunked_prefill:  # without chunking every prompt must fit the budget at once
        longest = max(len(r["prompt"]) + r["max_tokens"] for r in reqs)
        cfg = SchedulerConfig(**{**_asdict(cfg), "max_num_batched_tokens": max(cfg.max_num_batched_tokens, longest)})
    return cfg, reqs


def _asdict(cfg: SchedulerConfig) -> dict[str, Any]:
    return {f: getattr(cfg, f) for f in cfg.__slots__}


def _build(spec: dict[str, Any], t: float) -> Request:
    return Request(spec["id"], spec["prompt"], max_tokens=spec["max_tokens"], priority=spec["priority"],
                   arrival_time=t)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_mixes_respect_budgets_and_leave_the_pool_clean(
    w: tuple[SchedulerConfig, list[dict[str, Any]]],
) -> None:
    cfg, specs = w
    s = Scheduler(cfg)
    reqs: list[Request] = []
    step = 0
    while step < 5000:
        for spec in specs:
            if spec["arrival_step"] == step:
                reqs.append(_build(spec, float(step)))
                s.add_request(reqs[-1])
        if not s.has_work() and len(reqs) == len(specs):
            break
        out = s.schedule(float(step))
        assert out.num_tokens <= cfg.max_num_batched_tokens
        assert sum(out.num_scheduled) == out.num_tokens
        assert len(s.running) <= cfg.max_num_seqs
        assert 0.0 <= s.kv_usage <= 1.0
        s.update_from_output(out, float(step) + 0.5)
        assert 0.0 <= s.kv_usage <= 1.0
        assert s.kv.check_consistency() == []
        for r in s.running:  # a running request holds exactly the blocks its computed tokens need
            assert len(r.block_ids) == -(-r.num_computed_tokens // cfg.block_size)
        step += 1
    assert all(r.status is RequestStatus.FINISHED for r in reqs), "every request finishes"
    assert all(r.num_output_tokens == r.max_tokens for r in reqs)
    assert s.kv.num_free == cfg.num_gpu_blocks - 1, "no block leaks"
    assert s.kv.check_consistency() == []
    assert s.kv.usage == 0.0


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_fast_forward_replays_decode_runs_exactly(w: tuple[SchedulerConfig, list[dict[str, Any]]]) -> None:
    cfg, specs = w
    results = []
    for ff in (False, True):
        eng = Engine(cfg, MODEL, fast_forward=ff)
        arrivals = sorted((spec["arrival_step"] * 0.05, k) for k, spec in enumerate(specs))
        reqs = []
        for t, k in arrivals:
            eng.run_until(t)
            reqs.append(_build(specs[k], t))
            eng.add_request(reqs[-1])
        eng.run_until(float("inf"))
        assert eng.scheduler.kv.check_consistency() == []
        assert eng.scheduler.kv.num_free == cfg.num_gpu_blocks - 1
        results.append((
            sorted((r.req_id, r.first_token_time, r.finish_time, r.num_preemptions, r.num_cached_tokens,
                    tuple(r.output_token_ids)) for r in reqs),
            eng.scheduler.counters.steps,
            eng.scheduler.kv.free_list(),
            sorted(eng.scheduler.kv.cached.items()),
        ))
    assert results[0] == results[1]
