"""Engine driver behaviour: virtual time, fast-forwarded decode runs, timing of tokens."""

from __future__ import annotations

import pytest

from shared.core.engine import CalibratedStepTime, Engine, Request, SchedulerConfig

MODEL = CalibratedStepTime(base_s=0.01, per_token_s=1e-4)


def _run(ff: bool) -> tuple[Engine, list[Request]]:
    eng = Engine(SchedulerConfig(num_gpu_blocks=200, enable_prefix_caching=True), MODEL, fast_forward=ff)
    reqs = [Request(f"r{i}", [i % 3] * 40 + [i] * 9, max_tokens=100 + 7 * i, arrival_time=0.3 * i)
            for i in range(6)]
    for r in reqs:
        eng.run_until(r.arrival_time)
        eng.add_request(r)
    eng.run_until(float("inf"))
    return eng, reqs


def test_fast_forward_skips_most_decode_steps_with_identical_results() -> None:
    slow, slow_reqs = _run(False)
    fast, fast_reqs = _run(True)
    assert fast.stats.fast_steps > 0.8 * fast.scheduler.counters.steps
    assert [(r.first_token_time, r.finish_time, r.output_token_ids) for r in slow_reqs] == [
        (r.first_token_time, r.finish_time, r.output_token_ids) for r in fast_reqs
    ]
    assert slow.scheduler.kv.free_list() == fast.scheduler.kv.free_list()


def test_an_idle_engine_starts_a_request_at_its_arrival_time() -> None:
    eng = Engine(SchedulerConfig(), MODEL)
    req = Request("a", [1] * 10, max_tokens=3, arrival_time=5.0)
    eng.add_request(req)
    eng.run_until(float("inf"))
    assert req.first_scheduled_time == 5.0
    assert req.ttft == pytest.approx(0.01 + 1e-4 * 10)
    assert req.e2e == pytest.approx(req.ttft + 2 * (0.01 + 1e-4))
    assert req.mean_itl == pytest.approx(0.01 + 1e-4)


def test_run_until_executes_only_steps_that_start_before_the_limit() -> None:
    eng = Engine(SchedulerConfig(), MODEL)
    eng.add_request(Request("a", [1] * 10, max_tokens=50))
    eng.run_until(0.05)
    assert eng.now >= 0.05
    assert eng.now - (0.01 + 1e-4) < 0.05


def test_log_histogram_locate_agrees_with_observe() -> None:
    from shared.core.engine.stats import LogHistogram

    h = LogHistogram()
    for v in (1e-6, 0.0071, 0.0072, 0.5, 3.0, 1e6):
        i, lo, hi = h.locate(v)
        before = list(h.counts)
        h.observe(v)
        assert [a - b for a, b in zip(h.counts, before, strict=True)].index(1) == i
        assert lo <= v < hi or (i == 0 and v <= lo + 1e-5)
