"""Properties over random pools and requests: scores stay in [0, 1], every answer has endpoints or a reason,
and the approximate index stays bounded however much traffic it sees."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.core.engine import CalibratedStepTime
from shared.core.routing import (
    DataConfig,
    Decision,
    Endpoint,
    EndpointMetrics,
    EndpointState,
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


@contextlib.contextmanager
def columns_from(n: int) -> Iterator[None]:
    """Lists of at least ``n`` candidates read from the pool's columns (``COLUMNS_FROM``) within the block."""
    import shared.core.routing.cycle as cyc

    saved, cyc.COLUMNS_FROM = cyc.COLUMNS_FROM, n
    try:
        yield
    finally:
        cyc.COLUMNS_FROM = saved


def _norm(out: object) -> object:
    if out is None:
        return None
    items = list(out)  # type: ignore[call-overload]
    return [x.id if hasattr(x, "id") else float(x) for x in items]


def three_ways(run: Callable[[list[EndpointState]], object], pool: list[EndpointState]) -> object:
    """``run`` over the pool from its columns, over a copy of it from the columns gathered, and over the pool endpoint
    by endpoint: the three must agree exactly (each run gets a fresh cycle: it caches per list)."""
    with columns_from(0):
        whole, gathered = _norm(run(pool)), _norm(run(list(pool)))
    with columns_from(1 << 30):
        each = _norm(run(pool))
    assert whole == gathered == each
    return whole


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
    pool = state.pool("m")  # the pool list itself: the columns are read
    if not pool:
        return
    for scorer in (QueueScorer("q", None), KvUtilizationScorer("k", None)):
        three_ways(lambda cands, sc=scorer: sc.score(cycle(state, now=now), cands), pool)  # type: ignore[misc]
    from shared.core.routing.filters.saturation import SaturationFilter
    from shared.core.routing.saturation import DetectorConfig

    sat = SaturationFilter("sat", DetectorConfig())
    shed = RouteRequest("shed", "m", priority=-1)
    assert three_ways(lambda cands: sat.filter(cycle(state, shed, now=now), cands), pool) == [
        e.id for e in pool if not sat.detector.saturated(e, now)]
    stale = StaleMetricsFilter("s", StaleParams())
    assert three_ways(lambda cands: stale.filter(cycle(state, now=now), cands), pool) == [
        e.id for e in pool if e.metrics is not None and e.metrics.ts >= now - 0.2]
    draining = DrainingFilter("d", None)
    assert three_ways(lambda cands: draining.filter(cycle(state, now=now), cands), pool) == [
        e.id for e in pool if e.metrics is None or not e.metrics.draining]


quiet_metrics = st.one_of(st.none(), st.builds(EndpointMetrics, ts=st.just(NOW), waiting=st.integers(0, 1),
                                                running=st.integers(0, 1),
                                                active_loras=st.lists(st.sampled_from("ab"), max_size=1).map(tuple)))
quiet_specs = st.lists(st.tuples(quiet_metrics, st.integers(0, 1), st.just(0), st.just(False)), min_size=2,
                       max_size=8)


@settings(max_examples=300, deadline=None)
@given(specs=quiet_specs, failed=st.lists(st.tuples(st.integers(0, 7), st.floats(NOW - 15, NOW + 5)), max_size=4),
       served=st.lists(st.integers(0, 7), max_size=2), moved=st.lists(st.integers(0, 7), max_size=4),
       took=st.lists(st.integers(0, 7), min_size=1, max_size=6), lora=st.one_of(st.none(), st.sampled_from("abc")))
def test_no_hit_lru_scores_the_whole_pool_from_its_columns_as_it_scores_each_endpoint(
        specs: list[tuple[EndpointMetrics | None, int, int, bool]], failed: list[tuple[int, float]], served: list[int],
        moved: list[int], took: list[int], lora: str | None) -> None:
    # Failures, successes and in-flight changes after the columns were built reach them (the whole pool reads the
    # columns; a filtered candidate list reads each endpoint). Quiet engines, so that idleness decides often.
    from shared.core.routing.scorers.no_hit_lru import NoHitLruScorer, NoHitParams

    state = build(specs)
    state.columns("m")
    n = len(specs)
    for i, when in failed:
        state.dispatched(f"f{i}{when}", f"e{i % n}", 10, min(when, NOW))
        state.finished(f"f{i}{when}", ok=False, now=when)
    for i in served:
        state.dispatched(f"s{i}", f"e{i % n}", 10, NOW)
        state.finished(f"s{i}", ok=True, now=NOW)
    for i in moved:
        st_ = state.endpoints[f"e{i % n}"]
        st_.inflight_requests = 1 - st_.inflight_requests
    s = NoHitLruScorer("n", NoHitParams(source="approximate", cold_below=0.3))
    for i in took:
        s.picked(cycle(state), state.endpoints[f"e{i % n}"])
    pool = state.pool("m")  # the pool list itself: the columns are read
    cold = RouteRequest("cold", "m", token_ids=list(range(64)), lora=lora)
    three_ways(lambda cands: s.score(cycle(state, cold), cands), pool)


@settings(max_examples=300, deadline=None)
@given(specs=endpoint_specs, held=st.lists(st.tuples(st.integers(0, 11), st.sampled_from([0, 5, 10, 12])), max_size=8),
       penalty=st.sampled_from([0.0, 1.0, 5.0]),
       later=st.lists(st.tuples(st.integers(0, 11), st.sampled_from([0, 20_000, 200_000])), min_size=1, max_size=6),
       faster=st.lists(st.integers(0, 11), max_size=3))
def test_prefix_affinity_gates_the_whole_pool_from_its_columns_as_it_gates_each_endpoint(
        specs: list[tuple[EndpointMetrics | None, int, int, bool]], held: list[tuple[int, int]], penalty: float,
        later: list[tuple[int, int]], faster: list[int]) -> None:
    # The load gate's estimates over the whole pool come from its columns (in-flight tokens, peak prefill rates);
    # over a filtered list, from each endpoint. In-flight and GPU changes after the columns were built included.
    from shared.core.routing.filters.prefix_affinity import AffinityParams, PrefixAffinityFilter

    state = build(specs)
    n = len(specs)
    prompt = list(range(200))  # 12 full blocks
    for i, blocks in held:  # endpoint i holds the prompt's first ``blocks`` blocks
        state.remember(f"e{i % n}", cycle(state, RouteRequest("h", "m", token_ids=prompt[:blocks * 16])).chain.all())
    state.columns("m")
    for i, tokens in later:
        state.endpoints[f"e{i % n}"].inflight_tokens = tokens
    for i in faster:  # placement says the endpoint runs on a GPU ten times faster now
        state.upsert(state.endpoints[f"e{i % n}"].endpoint, CalibratedStepTime(base_s=1e-4, per_token_s=1e-6))
    f = PrefixAffinityFilter("a", AffinityParams(source="approximate", max_ttft_penalty_s=penalty))
    pool = state.pool("m")
    q = RouteRequest("q", "m", token_ids=prompt)
    three_ways(lambda cands: f.filter(cycle(state, q), cands), pool)


ops = st.lists(st.tuples(st.sampled_from(["upsert", "faster", "remove", "report", "report", "dispatch", "dispatch",
                                          "first", "ok", "fail", "unknown", "move", "peer_fail", "peer_ok",
                                          "peer_digest", "expire", "columns", "faster", "fail"]),
                         st.integers(0, 5), st.integers(0, 5), st.floats(NOW - 20, NOW + 20)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(steps=ops, reports=st.lists(metrics.filter(lambda m: m is not None), min_size=1, max_size=4))
def test_the_pool_columns_always_hold_what_each_endpoint_holds(steps: list[tuple[str, int, int, float]],
                                                                reports: list[EndpointMetrics]) -> None:
    # Every writer of an endpoint's figures (reports, dispatches, first tokens, ends, moves, failures told by peers,
    # re-placement on another GPU, endpoints leaving and joining) reaches its column, whenever the columns were built.
    import math as m_

    from shared.core.routing.domain import kv_free

    state = PoolState()
    for k in range(6):  # every endpoint placed, its pool's columns built before anything else happens
        state.upsert(Endpoint(id=f"e{k}", model="m" if k % 3 else "n"))
    state.columns("m"), state.columns("n")
    flights = 0
    for op, i, j, t in steps:
        eid, other = f"e{i}", f"e{j}"
        model = "m" if i % 3 else "n"  # two models: an endpoint's id may come back serving the other one
        if op == "upsert":
            state.upsert(Endpoint(id=eid, model=model))
        elif op == "faster":
            if eid in state.endpoints:
                state.upsert(state.endpoints[eid].endpoint, CalibratedStepTime(base_s=1e-4 * (j + 1), per_token_s=1e-6))
        elif op == "remove":
            state.remove(eid)
        elif op == "report":
            rep = reports[j % len(reports)]
            state.update_metrics(eid, EndpointMetrics(ts=t, waiting=rep.waiting, running=rep.running,
                                                      kv_usage=rep.kv_usage, draining=rep.draining))
        elif op == "dispatch":
            flights += 1
            state.dispatched(f"r{flights}", eid, j * 100, t)
        elif op in ("first", "ok", "fail", "unknown"):
            rid = f"r{1 + (i * 7 + j) % max(flights, 1)}"
            if op == "first":
                state.first_token(rid)
            else:
                state.finished(rid, {"ok": True, "fail": False, "unknown": None}[op], t)
        elif op == "move":
            state.moved(f"r{1 + i % max(flights, 1)}", other, t)
        elif op in ("peer_fail", "peer_ok"):
            state.peer_outcome(eid, op == "peer_fail", t)
        elif op == "peer_digest":
            state.peer_failing(eid, j + 1, abs(t - NOW) / 2, t)
        elif op == "expire":
            state.expire_flights(t, 3)
        else:
            for mdl in ("m", "n"):
                state.columns(mdl)
    for mdl in ("m", "n"):
        cols = state.columns(mdl)
        for k, e in enumerate(state.pool(mdl)):
            rep = e.metrics
            assert cols.members[k] is e
            assert cols.requests[k] == e.inflight_requests and cols.tokens[k] == e.inflight_tokens
            assert cols.rate[k] == e.effective_rate and cols.prefill[k] == e.prefill_rate
            assert (m_.isnan(cols.failed_at[k]) if e.failed_at is None else cols.failed_at[k] == e.failed_at)
            assert cols.kv_free[k] == kv_free(rep)
            if rep is None:
                assert cols.ts[k] == -m_.inf and cols.waiting[k] == -1 and cols.busy[k] == 0 and not cols.draining[k]
            else:
                assert (cols.ts[k], cols.waiting[k], cols.busy[k]) == (rep.ts, rep.waiting, rep.running + rep.waiting)
                assert cols.draining[k] == rep.draining and cols.kv_usage[k] == rep.kv_usage
