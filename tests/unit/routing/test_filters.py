"""Filters (one table per plugin): who is kept, and why the others were dropped."""

from __future__ import annotations

import pytest

from shared.core.roles import NodeRole
from shared.core.routing import PoolState, RouteRequest
from shared.core.routing.filters import FILTERS
from shared.core.routing.filters.prefix_affinity import AffinityParams, PrefixAffinityFilter
from shared.core.routing.filters.role import RoleParams
from shared.core.routing.filters.stale import StaleParams
from shared.core.routing.saturation import DetectorConfig
from tests.unit.routing.helpers import NOW, cands, cycle, ids, met, pool, req


def run(name: str, params: object, state: object, request: object = None) -> list[str]:
    cls = FILTERS[name]
    f = cls(name, params if params is not None else cls.Params())  # type: ignore[arg-type]
    return ids(f.filter(cycle(state, request), cands(state)))  # type: ignore[arg-type]


def test_served_filter_keeps_endpoints_that_can_load_or_already_run_the_adapter() -> None:
    state = pool(met(), met(active_loras=("a",)), met(waiting_loras=("a",)), met(),
                 adapters=(frozenset({"a"}), frozenset(), frozenset(), frozenset({"b"})))
    assert run("served-filter", None, state, req(lora="a")) == ["e0", "e1", "e2"]
    assert run("served-filter", None, state, req()) == ["e0", "e1", "e2", "e3"]


def test_draining_filter_drops_draining_endpoints() -> None:
    state = pool(met(draining=True), met(), None)
    assert run("draining-filter", None, state) == ["e1", "e2"]


@pytest.mark.parametrize(("ages", "bound", "kept"), [
    ((0.0, 0.1, 0.2, 0.21), None, ["e0", "e1", "e2"]),  # data layer default 200 ms
    ((0.0, 0.1, 0.2, 0.21), 0.05, ["e0"]),
    ((1.0, 2.0, 3.0, 4.0), None, []),  # fail closed
])
def test_stale_metrics_filter_keeps_fresh_reports_only(ages: tuple[float, ...], bound: float | None,
                                                         kept: list[str]) -> None:
    state = pool(*(met(ts=NOW - a) for a in ages))
    assert run("stale-metrics-filter", StaleParams(max_age_s=bound), state) == kept


def test_stale_metrics_filter_drops_endpoints_that_never_reported() -> None:
    assert run("stale-metrics-filter", None, pool(None, met())) == ["e1"]


@pytest.mark.parametrize(("priority", "kept"), [(-1, ["e0", "e3"]), (0, ["e0", "e1", "e2", "e3", "e4"])])
def test_saturation_filter_spares_only_sheddable_traffic_the_saturated(priority: int, kept: list[str]) -> None:
    # queue 5 is at the threshold (kept), 6 over it; KV 0.81 over 0.8; e4 stale
    state = pool(met(waiting=5), met(waiting=6), met(kv=0.81), met(kv=0.8), met(ts=NOW - 1))
    assert run("saturation-filter", DetectorConfig(), state, req(priority=priority)) == kept


def test_saturation_filter_headroom_widens_the_limits() -> None:
    state = pool(met(waiting=6), met(waiting=8))
    assert run("saturation-filter", DetectorConfig(headroom=0.4), state, req(priority=-1)) == ["e0"]


@pytest.mark.parametrize(("phase", "kept"), [("prefill", ["e0", "e1"]), ("decode", ["e0", "e2"])])
def test_role_filter_keeps_endpoints_running_the_phase(phase: str, kept: list[str]) -> None:
    state = pool(met(), met(), met(), roles=(NodeRole.MIXED, NodeRole.PREFILL, NodeRole.DECODE))
    assert run("role-filter", RoleParams(phase=phase), state) == kept  # type: ignore[arg-type]


def warm_pool(hot_blocks: int, inflight_hot: int = 0, inflight_cold: int = 0) -> tuple[PoolState, RouteRequest]:
    """e0 holds ``hot_blocks`` of a 10-block (160-token) prompt; e1 holds nothing."""
    state = pool(met(), met())
    r = req(tokens=160, seed=7)
    c = cycle(state, r)
    state.remember("e0", c.chain.all()[:hot_blocks])
    state.endpoints["e0"].inflight_tokens = inflight_hot
    state.endpoints["e1"].inflight_tokens = inflight_cold
    return state, r


@pytest.mark.parametrize(("hot", "kept"), [(8, ["e0"]), (10, ["e0"]), (7, ["e0", "e1"]), (0, ["e0", "e1"])])
def test_affinity_filter_sticks_to_endpoints_holding_at_least_the_threshold(hot: int, kept: list[str]) -> None:
    state, r = warm_pool(hot)
    assert run("prefix-affinity-filter", AffinityParams(source="approximate"), state, r) == kept


def test_affinity_filter_opens_when_the_sticky_endpoint_is_too_far_behind() -> None:
    # default prefill rate 15,928 tok/s: 18 s penalty ≈ 286,704 tokens (llm-d's τ)
    state, r = warm_pool(10, inflight_hot=290_000)
    assert run("prefix-affinity-filter", AffinityParams(source="approximate"), state, r) == ["e0", "e1"]
    state, r = warm_pool(10, inflight_hot=280_000)
    assert run("prefix-affinity-filter", AffinityParams(source="approximate"), state, r) == ["e0"]


@pytest.mark.parametrize("gpu", ["default", "ten times faster"])
def test_affinity_filter_gate_over_the_whole_pool_sees_a_gpu_change_made_after_its_columns(
        gpu: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import shared.core.routing.cycle as cyc
    from shared.core.engine import CalibratedStepTime

    monkeypatch.setattr(cyc, "COLUMNS_FROM", 0)  # read from the columns however short the pool

    # e0 holds the prompt, 20,000 tokens queued (1.26 s at 15,928 tok/s); e1 holds nothing, 200,000 queued: at the
    # default rate 12.6 s (the gate stays shut), on a GPU ~60x faster 0.2 s (more than 1 s better: it opens)
    state, r = warm_pool(10, inflight_hot=20_000, inflight_cold=200_000)
    state.columns("m")
    if gpu != "default":
        state.upsert(state.endpoints["e1"].endpoint, CalibratedStepTime(base_s=1e-4, per_token_s=1e-6))
    f = PrefixAffinityFilter("a", AffinityParams(source="approximate", max_ttft_penalty_s=1.0))
    kept = ids(f.filter(cycle(state, r), state.pool("m")))  # the pool list itself: read from its columns
    assert kept == (["e0"] if gpu == "default" else ["e0", "e1"])


@pytest.mark.parametrize("base_s", [float("inf"), float("nan")])
def test_a_gpu_model_without_a_finite_step_time_gives_the_default_peak_prefill_rate(base_s: float) -> None:
    from shared.core.engine import CalibratedStepTime
    from shared.core.routing.state import DEFAULT_PREFILL_TOKENS_PER_S

    # the gate's estimates divide by the rate: 0 (an infinite step) raised, NaN kept the gate shut
    state = pool(met(), met())
    state.columns("m")
    st = state.upsert(state.endpoints["e1"].endpoint, CalibratedStepTime(base_s=base_s, per_token_s=1e-5))
    assert st.prefill_rate == DEFAULT_PREFILL_TOKENS_PER_S == state.columns("m").prefill[1]


def test_affinity_filter_explores_with_its_probability() -> None:
    state, r = warm_pool(10)
    f = PrefixAffinityFilter("a", AffinityParams(source="approximate", exploration_probability=1.0))
    assert ids(f.filter(cycle(state, r), cands(state))) == ["e0", "e1"]


@pytest.mark.parametrize(("name", "params", "fragment"), [
    ("stale-metrics-filter", StaleParams(max_age_s=0), "max_age_s"),
    ("prefix-affinity-filter", AffinityParams(threshold=1.5), "threshold"),
    ("prefix-affinity-filter", AffinityParams(source="exact"), "source"),
    ("saturation-filter", DetectorConfig(kv_threshold=0), "kv_threshold"),
])
def test_bad_parameters_are_named(name: str, params: object, fragment: str) -> None:
    problems = FILTERS[name].check(params)  # type: ignore[arg-type]
    assert problems and fragment in problems[0]
