"""Brokered virtual-time cluster: every request accounted for once, stealing and recovery do their job."""

from __future__ import annotations

import random

import pytest

from shared.core.engine import KVLink, SchedulerConfig
from shared.core.engine.step_time import CalibratedStepTime
from shared.core.queueing import SchedulerParams
from shared.core.sim.brokered import BrokeredResult, BrokeredSpec, simulate_brokered
from shared.core.sim.workload import TraceRequest

STEP = CalibratedStepTime(base_s=0.008, per_token_s=0.00005, per_kv_token_s=1e-8)
CFG = SchedulerConfig(block_size=16, num_gpu_blocks=8000, max_num_seqs=64, max_num_batched_tokens=4096)


def trace(n: int = 600, rate: float = 25.0, seed: int = 1, prompt: tuple[int, int] = (200, 2000),
          out: tuple[int, int] = (20, 300)) -> list[TraceRequest]:
    rng = random.Random(seed)
    t, reqs = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        reqs.append(TraceRequest(t, rng.randint(*prompt), rng.randint(*out)))
    return reqs


def run(name: str, tr: list[TraceRequest] | None = None, **kw: object) -> BrokeredResult:
    params = kw.pop("params", None) or SchedulerParams(name=name, min_load_score=3)  # type: ignore[arg-type]
    spec = BrokeredSpec(nodes=4, config=CFG, step_model=STEP, params=params, **kw)  # type: ignore[arg-type]
    return simulate_brokered(tr or trace(), spec)


def accounted(res: BrokeredResult) -> dict[str, object]:
    s = res.summary()
    assert s["pending"] == 0 and s["duplicated"] == 0
    assert all(o.finals == (0 if o.status == "lost" else 1) for o in res.outcomes)
    return s


def test_local_on_an_imbalanced_pattern_completes_everything_slowly() -> None:
    s = accounted(run("local", skew=0.8))
    assert s["completed"] == 600 and s["stolen"] == 0


def test_global_stealing_cuts_the_queue_tail_of_an_imbalanced_pattern() -> None:
    local, glob = accounted(run("local", skew=0.8)), accounted(run("global", skew=0.8))
    assert glob["completed"] == 600 and int(glob["stolen"]) > 0  # type: ignore[call-overload]
    assert glob["queue_s"]["p99"] * 2 <= local["queue_s"]["p99"]  # type: ignore[index]


def test_no_steal_when_peers_are_below_the_min_load_score() -> None:
    params = SchedulerParams(name="global", min_load_score=1e9)
    assert accounted(run("global", skew=0.8, params=params))["stolen"] == 0


def test_a_killed_node_in_global_mode_loses_nothing() -> None:
    params = SchedulerParams(name="global", min_load_score=3, sync_period_s=0.5, expire_period_s=2.0)
    res = run("global", skew=0.8, kill=(0, 8.0), params=params)
    s = accounted(res)
    assert s["completed"] == 600 and int(s["recovered"]) > 0  # type: ignore[call-overload]
    assert any(o.runs > 1 for o in res.outcomes)  # in-flight work re-ran elsewhere, answered once


def test_a_killed_node_in_local_mode_loses_its_requests_and_says_so() -> None:
    s = accounted(run("local", skew=0.8, kill=(0, 8.0)))
    assert int(s["lost"]) > 0  # type: ignore[call-overload]


def test_ttl_expiry_is_counted_never_silent() -> None:
    params = SchedulerParams(name="local", ttl_s=1.0)
    s = accounted(run("local", skew=1.0, params=params))
    assert int(s["expired"]) > 0 and s["completed"] + s["expired"] == 600  # type: ignore[operator, call-overload]


def test_max_size_rejections_are_counted() -> None:
    params = SchedulerParams(name="local", max_size=8)
    s = accounted(run("local", skew=1.0, params=params))
    assert int(s["rejected"]) > 0 and s["completed"] + s["rejected"] == 600  # type: ignore[operator, call-overload]


def test_router_queue_holds_requests_until_a_node_has_room() -> None:
    s = accounted(run("local", skew=0.8, router_queue=True))
    assert s["completed"] == 600


def test_splitwise_runs_prefill_and_decode_on_different_nodes() -> None:
    link = KVLink(bandwidth_bytes_s=50e9, latency_s=1e-3)
    params = SchedulerParams(name="splitwise", sync_period_s=0.05, expire_period_s=1.0)
    res = run("splitwise", prefill_nodes=2, kv_link=link, params=params)
    s = accounted(res)
    assert s["completed"] == 600
    for o in res.outcomes:
        if o.output_len > 1:
            assert o.served_by in (0, 1) and o.decode_by in (2, 3)
    assert sum(e.scheduler.counters.kv_transfers_out for e in res.engines) == sum(
        1 for o in res.outcomes if o.output_len > 1)


def test_aggregated_splitwise_spreads_over_mixed_nodes() -> None:
    res = run("splitwise", params=SchedulerParams(name="splitwise", sync_period_s=0.05, expire_period_s=1.0))
    accounted(res)
    assert {o.served_by for o in res.outcomes} == {0, 1, 2, 3} and all(o.decode_by == -1 for o in res.outcomes)


@pytest.mark.parametrize(("kw", "needle"), [
    ({"nodes": 0}, "nodes must be >= 1"),
    ({"skew": 1.5}, "skew"),
    ({"prefill_nodes": 2}, "prefill_nodes needs scheduler_name splitwise"),
    ({"kill": (9, 1.0)}, "kill names node 9"),
])
def test_a_bad_spec_is_refused(kw: dict[str, object], needle: str) -> None:
    spec = BrokeredSpec(**{"nodes": 4, "config": CFG, "step_model": STEP, **kw})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=needle):
        simulate_brokered(trace(10), spec)


def test_runs_are_deterministic() -> None:
    a = run("global", skew=0.8).summary()
    b = run("global", skew=0.8).summary()
    assert a == b


def test_a_prefill_node_keeps_pulling_after_a_step_that_finished_everything() -> None:
    link = KVLink(bandwidth_bytes_s=1e9, latency_s=1e-3)  # slow link: blocks stay held while the KV is sent
    params = SchedulerParams(name="splitwise", ttl_s=1e6, sync_period_s=0.05, expire_period_s=1.0)
    s = accounted(run("splitwise", prefill_nodes=1, kv_link=link, params=params, tr=trace(rate=60.0)))
    assert s["completed"] == 600 and s["expired"] == 0


def test_the_router_queue_answers_expiry_from_the_routing_cores_flow_control() -> None:
    params = SchedulerParams(name="local", ttl_s=0.5)
    s = accounted(run("local", skew=1.0, router_queue=True, params=params, tr=trace(rate=200.0)))
    assert int(s["expired"]) > 0 and s["completed"] + s["expired"] == 600  # type: ignore[operator, call-overload]


def test_a_request_larger_than_any_engines_cache_is_rejected_at_once_not_left_to_block_its_queue() -> None:
    # it sat at the head of its node's queue until its TTL, every request behind it expiring too
    huge = TraceRequest(0.0, CFG.num_gpu_blocks * CFG.block_size * 2, 10)
    rest = [TraceRequest(0.01 * (i + 1), 200, 20) for i in range(40)]
    res = run("local", [huge, *rest], params=SchedulerParams(name="local", ttl_s=30))
    s = accounted(res)
    assert res.outcomes[0].status == "rejected" and "KV blocks" in res.outcomes[0].reason
    assert s["completed"] == 40 and s["expired"] == 0
