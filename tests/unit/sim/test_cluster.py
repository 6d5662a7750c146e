"""Virtual-time cluster simulation and its routers."""

from __future__ import annotations

from shared.core.engine import CalibratedStepTime, Engine, Request, SchedulerConfig
from shared.core.sim import ClusterSpec, LeastOutstanding, RoundRobin, TraceRequest, simulate

MODEL = CalibratedStepTime(base_s=0.01, per_token_s=1e-4)
CFG = SchedulerConfig(num_gpu_blocks=2000)


def test_round_robin_deals_requests_in_turn() -> None:
    trace = [TraceRequest(0.1 * i, 20, 5) for i in range(7)]
    res = simulate(trace, ClusterSpec(3, CFG, MODEL))
    assert res.assignment == [0, 1, 2, 0, 1, 2, 0]


def test_least_outstanding_avoids_the_busy_replica() -> None:
    trace = [TraceRequest(0.0, 20, 500), TraceRequest(0.01, 20, 5), TraceRequest(0.5, 20, 5),
             TraceRequest(1.0, 20, 5)]
    res = simulate(trace, ClusterSpec(2, CFG, MODEL, router=LeastOutstanding))
    assert res.assignment == [0, 1, 1, 1]


def test_least_outstanding_does_not_see_finishes_of_a_step_still_running() -> None:
    eng = Engine(CFG, MODEL)
    eng.add_request(Request("a", [1] * 10, max_tokens=1))
    eng.run_until(0.001)  # the prefill step (which also finishes 'a') started but ends at 0.011
    assert eng.num_outstanding == 0
    from shared.core.sim.routers import outstanding_at

    assert outstanding_at(eng, 0.005) == 1
    assert outstanding_at(eng, 0.02) == 0


def test_every_request_completes_and_the_summary_adds_up() -> None:
    trace = [TraceRequest(0.05 * i, 100 + 10 * i, 20 + i) for i in range(40)]
    res = simulate(trace, ClusterSpec(4, CFG, MODEL, router=RoundRobin))
    s = res.summary()
    assert s["completed"] == 40 and s["rejected"] == 0
    assert all(r.num_output_tokens == 20 + int(r.req_id) for r in res.requests)
    assert s["ttft_s"]["p50"] >= 0.01  # type: ignore[index]
    assert s["preemptions"] == 0


def test_shared_trace_prefixes_hit_the_cache_on_one_replica() -> None:
    trace = [TraceRequest(1.0 * i, 1500, 4, prefix_ids=(7, 8, 100 + i)) for i in range(5)]
    res = simulate(trace, ClusterSpec(1, CFG, MODEL))
    assert [r.num_cached_tokens for r in res.requests] == [0] + [1024] * 4


def test_a_request_that_cannot_fit_is_reported_not_fatal() -> None:
    small = SchedulerConfig(num_gpu_blocks=10)
    res = simulate([TraceRequest(0.0, 1000, 5), TraceRequest(0.1, 20, 5)], ClusterSpec(1, small, MODEL))
    assert len(res.rejected) == 1 and len(res.requests) == 1
    assert res.summary()["completed"] == 1


def test_simulation_is_deterministic_and_fast_forward_does_not_change_it() -> None:
    trace = [TraceRequest(0.02 * i, 50 + (i * 37) % 400, 10 + (i * 13) % 90) for i in range(60)]
    runs = [simulate(trace, ClusterSpec(3, CFG, MODEL, router=LeastOutstanding, fast_forward=ff)) for ff in (1, 0)]
    assert [(r.first_token_time, r.finish_time) for r in runs[0].requests] == [
        (r.first_token_time, r.finish_time) for r in runs[1].requests
    ]
