"""Properties over random pools and requests: scores stay in [0, 1], every answer has endpoints or a reason,
and the approximate index stays bounded however much traffic it sees."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.core.engine import CalibratedStepTime
from shared.core.routing import (
    DataConfig,
    Decision,
    Endpoint,
    EndpointMetrics,
    PoolState,
    Refusal,
    Router,
    RouteRequest,
    builtin_config,
    builtin_names,
)
from shared.core.routing.scorers import SCORERS
from shared.core.routing.scorers.predicted_latency import LatencyParams, predicted_ttft
from shared.core.routing.scorers.prefix import PrefixParams
from tests.unit.routing.helpers import NOW, cands, cycle

metrics = st.one_of(st.none(), st.builds(
    EndpointMetrics,
    ts=st.floats(NOW - 2, NOW),
    waiting=st.integers(0, 500),
    running=st.integers(0, 600),
    kv_usage=st.floats(0, 1.2, allow_nan=False),
    active_loras=st.lists(st.sampled_from("abc"), max_size=2).map(tuple),
    waiting_loras=st.lists(st.sampled_from("abc"), max_size=2).map(tuple),
    draining=st.booleans(),
))
endpoint_specs = st.lists(st.tuples(metrics, st.integers(0, 50), st.integers(0, 2_000_000), st.booleans()),
                          min_size=1, max_size=12)
requests = st.builds(
    RouteRequest,
    request_id=st.text(min_size=1, max_size=6),
    model=st.just("m"),
    token_ids=st.one_of(st.none(), st.lists(st.integers(0, 3), max_size=200)),
    priority=st.integers(-2, 2),
    lora=st.one_of(st.none(), st.sampled_from("abc")),
    slo_ttft_s=st.one_of(st.none(), st.floats(0.01, 10)),
)


def build(specs: list[tuple[EndpointMetrics | None, int, int, bool]]) -> PoolState:
    state = PoolState(DataConfig(approx_capacity=64))
    for i, (m, inflight, tokens, modelled) in enumerate(specs):
        step = CalibratedStepTime(base_s=0.001 * (i + 1), per_token_s=1e-5 * (i + 1)) if modelled else None
        state.upsert(Endpoint(id=f"e{i}", model="m", max_loras=i % 3, adapters=frozenset("ab"[: i % 3])), step)
        if m is not None:
            state.update_metrics(f"e{i}", m)
        state.endpoints[f"e{i}"].inflight_requests = inflight
        state.endpoints[f"e{i}"].inflight_tokens = tokens
    return state


@settings(max_examples=80, deadline=None)
@given(specs=endpoint_specs, request=requests, warm=st.integers(0, 12))
def test_every_scorer_stays_within_0_and_1(specs: list, request: RouteRequest, warm: int) -> None:  # type: ignore[type-arg]
    state = build(specs)
    c = cycle(state, request)
    hashes = c.chain.all()
    for i in range(min(warm, len(specs))):
        state.remember(f"e{i}", hashes[: i + 1])
        state.precise.add(state.endpoints[f"e{i}"].slot, hashes[:i])
    c = cycle(state, request)
    for name, cls in SCORERS.items():
        values = cls(name, cls.Params()).score(c, cands(state))
        if values is None:
            continue
        assert len(values) == len(specs)
        assert all(0.0 <= v <= 1.0 and not math.isnan(v) for v in values), (name, values)


@settings(max_examples=80, deadline=None)
@given(specs=endpoint_specs, reqs=st.lists(requests, min_size=1, max_size=8),
       profile=st.sampled_from(builtin_names()), seed=st.integers(0, 3))
def test_never_an_empty_answer_without_a_reason(specs: list, reqs: list[RouteRequest], profile: str,  # type: ignore[type-arg]
                                                  seed: int) -> None:
    r = Router(builtin_config(profile), build(specs), seed)
    for request in reqs:
        out = r.route(request, NOW)
        if isinstance(out, Decision):
            assert out.endpoints and all(e in r.state.endpoints for e in out.endpoints)
            assert len(set(out.endpoints)) == len(out.endpoints)
        else:
            assert isinstance(out, Refusal) and out.reason and out.code in (429, 503)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 300), prompt=st.integers(16, 2000))
def test_the_assumed_state_index_is_bounded_by_capacity_times_endpoints(n: int, prompt: int) -> None:
    state = build([(EndpointMetrics(ts=NOW), 0, 0, False)] * 3)
    r = Router(builtin_config("approx-prefix"), state)
    for i in range(n):
        r.route(RouteRequest(str(i), "m", token_ids=[i] * prompt), NOW)
        r.finished(str(i))
    r.flush()
    assert state.approx.entries() <= 64 * 3
    assert state.in_flight() == 0


@settings(max_examples=80, deadline=None)
@given(specs=endpoint_specs, request=requests, warm=st.integers(0, 12), bumps=st.lists(
    st.tuples(st.integers(0, 11), st.integers(0, 100_000)), max_size=6))
def test_column_scores_equal_the_per_endpoint_formulas(specs: list, request: RouteRequest, warm: int,  # type: ignore[type-arg]
                                                       bumps: list[tuple[int, int]]) -> None:
    state = build(specs)
    hashes = cycle(state, request).chain.all()
    for i in range(min(warm, len(specs))):
        state.remember(f"e{i}", hashes[: i + 1])
        state.precise.add(state.endpoints[f"e{i}"].slot, hashes[:i])
    whole = state.pool("m")
    state.columns("m")  # built now: later load changes must reach it
    for i, tokens in bumps:
        if i < len(specs):
            state.endpoints[f"e{i}"].inflight_tokens = tokens
    c = cycle(state, request)
    for name, cls in SCORERS.items():
        on_pool = cls(name, cls.Params()).score(c, whole)  # the pool itself: column path
        on_copy = cls(name, cls.Params()).score(c, list(whole))  # a filtered-looking list: per-endpoint path
        assert (on_pool is None) == (on_copy is None), name
        if on_pool is not None and on_copy is not None:
            assert list(on_pool) == list(on_copy), name
    lat = SCORERS["predicted-latency-scorer"]("p", LatencyParams()).score(c, whole)
    ttfts = [predicted_ttft(c, e, "hybrid") for e in whole]
    assert lat is not None and list(lat) == [min(ttfts) / t if request.slo_ttft_s is None or t <= request.slo_ttft_s
                         else min(ttfts) / t * 0.5 for t in ttfts]
    total = c.chain.total
    prefix = SCORERS["prefix-cache-scorer"]("p", PrefixParams(source="hybrid")).score(c, whole)
    if prefix is not None:
        assert list(prefix) == [c.matches("hybrid").get(e.slot, 0) / total for e in whole]


def test_columns_follow_every_load_change_and_pool_change() -> None:
    state = build([(EndpointMetrics(ts=NOW), 0, 0, True)] * 3)
    cols = state.columns("m")
    state.dispatched("r1", "e1", 300, NOW)
    state.endpoints["e2"].inflight_tokens = 70
    state.update_metrics("e0", EndpointMetrics(ts=NOW + 1, running=400))
    assert cols.tokens.tolist() == [0, 300, 70]
    assert cols.rate.tolist() == [e.effective_rate for e in state.pool("m")]
    state.first_token("r1")
    assert cols.tokens.tolist() == [0, 0, 70]
    state.remove("e0")
    state.upsert(Endpoint(id="e9", model="m"))
    now = state.columns("m")
    assert now is not cols and now.members is state.pool("m")
    assert now.tokens.tolist() == [0, 70, 0]
    assert now.position == {e.slot: i for i, e in enumerate(state.pool("m"))}
    state.endpoints["e1"].inflight_tokens = 5
    assert now.tokens.tolist() == [5, 70, 0]


@settings(max_examples=150, deadline=None)
@given(specs=endpoint_specs, later=st.lists(st.tuples(st.integers(0, 11), metrics.filter(lambda m: m is not None)),
                                            max_size=8),
       gone=st.lists(st.integers(0, 11), max_size=3), now=st.floats(NOW - 1, NOW + 1))
def test_the_pools_report_columns_score_and_filter_exactly_as_each_endpoints_report(
        specs: list[tuple[EndpointMetrics | None, int, int, bool]], later: list[tuple[int, EndpointMetrics]],
        gone: list[int], now: float) -> None:
    # The whole pool reads the report columns (written by each report); a filtered candidate list reads each
    # endpoint's own report. Reports arriving after the columns were built, and endpoints leaving, included.
    from shared.core.routing.filters.draining import DrainingFilter
    from shared.core.routing.filters.stale import StaleMetricsFilter, StaleParams
    from shared.core.routing.scorers.kv_utilization import KvUtilizationScorer
    from shared.core.routing.scorers.queue import QueueScorer

    state = build(specs)
    state.columns("m")
    for i, m in later:
        state.update_metrics(f"e{i}", m)
    for i in gone:
        state.remove(f"e{i}")
    pool = cands(state)
    if not pool:
        return
    c = cycle(state, now=now)
    for scorer in (QueueScorer("q", None), KvUtilizationScorer("k", None)):
        whole, each = scorer.score(c, pool), scorer.score(c, list(pool))
        assert (whole is None) == (each is None)
        if whole is not None and each is not None:
            assert list(map(float, whole)) == list(map(float, each))
    stale = StaleMetricsFilter("s", StaleParams())
    assert stale.filter(c, pool) == [e for e in pool if e.metrics is not None and e.metrics.ts >= now - 0.2]
    assert DrainingFilter("d", None).filter(c, pool) == [e for e in pool if e.metrics is None or not e.metrics.draining]
