"""The routing core driving the engine emulator in virtual time (``gantry simulate --router gantry[:PROFILE]``)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ops.cli.main import app, main
from shared.core.engine import CalibratedStepTime, SchedulerConfig
from shared.core.sim import ClusterSpec, TraceRequest, simulate
from shared.core.sim.gantry import GantryRouter

MODEL = CalibratedStepTime(base_s=0.005, per_token_s=5e-5)
CFG = SchedulerConfig(num_gpu_blocks=1500, enable_kv_events=True)  # ~11 tenant prefixes per replica


def shared_prefix_trace(n: int = 240, tenants: int = 30) -> list[TraceRequest]:
    """Each tenant's requests share 4 × 512-token units; one unique unit each."""
    return [TraceRequest(0.05 * i, 2560, 8, prefix_ids=(*(1000 * (i % tenants) + u for u in range(4)), 10**6 + i))
            for i in range(n)]


def run(router: object, trace: list[TraceRequest] | None = None) -> dict[str, object]:
    res = simulate(trace or shared_prefix_trace(), ClusterSpec(4, CFG, MODEL, router=lambda: router))  # type: ignore[arg-type,return-value]
    return res.summary()


def test_every_request_is_routed_and_completes() -> None:
    s = run(GantryRouter("default"))
    assert s["completed"] == 240 and s["rejected"] == 0


def test_prefix_aware_profiles_hit_the_cache_more_than_round_robin() -> None:
    from shared.core.sim import RoundRobin

    rr = run(RoundRobin())
    for profile in ("approx-prefix", "precise-prefix", "default"):
        s = run(GantryRouter(profile))
        assert s["prefix_cache_hit_rate"] > rr["prefix_cache_hit_rate"] + 0.1, profile  # type: ignore[operator]


def test_kv_events_feed_the_precise_index_with_the_engines_hashes() -> None:
    g = GantryRouter("precise-prefix")
    run(g)
    state = g.router.state
    assert len(state.precise) > 0
    assert g.decisions == 240


def test_the_same_run_decides_the_same_way() -> None:
    a, b = GantryRouter("default", seed=3), GantryRouter("default", seed=3)
    ra = simulate(shared_prefix_trace(), ClusterSpec(4, CFG, MODEL, router=lambda: a))
    rb = simulate(shared_prefix_trace(), ClusterSpec(4, CFG, MODEL, router=lambda: b))
    assert ra.assignment == rb.assignment


def test_in_flight_accounting_drains_once_everything_finished() -> None:
    g = GantryRouter("default")
    res = simulate(shared_prefix_trace(), ClusterSpec(4, CFG, MODEL, router=lambda: g))
    end = max(r.finish_time for r in res.requests)
    g._observe(res.engines, end)
    assert g.router.state.in_flight() == 0
    assert all(st.inflight_tokens == 0 for st in g.router.state.endpoints.values())


def test_cli_routes_with_a_named_profile() -> None:
    res = CliRunner().invoke(app, ["simulate", "--trace", "mooncake", "--replicas", "2", "--limit", "40",
                                   "--router", "gantry:precise-prefix", "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)
    assert s["completed"] + s["rejected"] == 40 and s["setup"]["router"] == "gantry:precise-prefix"


def test_cli_unknown_profile_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--router", "gantry:nope", "--limit", "5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown router profile 'nope'" in err


def test_router_replicas_share_engine_events_but_not_decisions() -> None:
    g = GantryRouter("approx-prefix", replicas=2)
    res = simulate(shared_prefix_trace(), ClusterSpec(4, CFG, MODEL, router=lambda: g))
    assert res.summary()["completed"] == 240
    a, b = g.routers
    assert a.state.approx.entries() and b.state.approx.entries()
    assert a.state.approx.masks != b.state.approx.masks  # each remembers only its own decisions
    assert a.state.precise.masks == b.state.precise.masks  # both consumed every KV event
    end = max(r.finish_time for r in res.requests)
    g._observe(res.engines, end)
    assert a.state.in_flight() == b.state.in_flight() == 0


def test_heterogeneous_pool_latency_predictor_favours_the_faster_gpus() -> None:
    fast, slow = CalibratedStepTime(base_s=0.005, per_token_s=3e-5), CalibratedStepTime(base_s=0.01, per_token_s=2e-4)
    trace = [TraceRequest(0.02 * i, 1000, 8) for i in range(300)]  # no shared prefixes: load only

    def spec(router: object) -> ClusterSpec:
        return ClusterSpec(4, CFG, fast, router=lambda: router, step_models=(fast, fast, slow, slow))  # type: ignore[arg-type,return-value]

    from shared.core.sim import RoundRobin

    rr = simulate(trace, spec(RoundRobin()))
    gantry = simulate(trace, spec(GantryRouter("default")))
    on_fast = sum(1 for k in gantry.assignment if k < 2)
    assert on_fast > 0.6 * len(trace)  # rr gives them exactly half
    assert gantry.summary()["ttft_s"]["p90"] < rr.summary()["ttft_s"]["p90"]  # type: ignore[index]
