"""The router end to end: config validation, admission, commit (assumed state, in-flight), P/D, shadow."""

from __future__ import annotations

import pytest

from shared.core.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from shared.core.roles import NodeRole
from shared.core.routing import (
    NO_ENDPOINT,
    SHED,
    Decision,
    EndpointMetrics,
    Refusal,
    RouteRequest,
    builtin_config,
    builtin_names,
)
from shared.core.routing.router import Router
from tests.unit.routing.helpers import NOW, PD, met, pool, req, router

PREFIX_ONLY = """
plugins:
  - {type: prefix-cache-scorer}
  - {type: queue-scorer}
profiles:
  - name: p
    plugins: [{ref: prefix-cache-scorer, weight: 3}, {ref: queue-scorer, weight: 2}]
"""


@pytest.mark.parametrize(("yaml", "fragment"), [
    ("plugins: [{type: nope}]", "unknown type 'nope'"),
    ("plugins: [{type: queue-scorer, parameters: {x: 1}}]", "unknown field `x`"),
    ("plugins: [{type: token-load-scorer, parameters: {queue_threshold_tokens: many}}]",
     "plugin 'token-load-scorer' (token-load-scorer): Expected `int`"),
    ("plugins: [{type: prefix-cache-scorer, parameters: {source: exact}}]", "source must be one of"),
    ("plugins: [{type: queue-scorer}]\nprofiles: [{name: p, plugins: [{ref: q}]}]", "no plugin named 'q'"),
    ("plugins: [{type: queue-scorer}]\nprofiles: [{name: p, plugins: [{ref: queue-scorer, weight: -1}]}]",
     "weight of 'queue-scorer' must be finite and >= 0"),
    ("plugins: [{type: queue-scorer}]\nprofiles: [{name: p, plugins: [{ref: queue-scorer, weight: .inf}]}]",
     "weight of 'queue-scorer' must be finite and >= 0 (got inf)"),
    ("plugins: [{type: random-picker}, {type: max-score-picker}]", "one picker allowed"),
    ("plugins: [{type: queue-scorer}]\nshadow: [x]", "shadow: no profile named 'x'"),
    ("plugins: [{type: queue-scorer}]\nhandler: {type: pd}", "no profile named 'decode'"),
    ("plugins: [{type: queue-scorer}]\ndata: {block_size: 0}", "block_size must be >= 1"),
])
def test_bad_configs_fail_at_load_with_a_clear_message(yaml: str, fragment: str) -> None:
    with pytest.raises(ValueError, match="router config") as err:
        router(yaml)
    assert fragment in str(err.value)


def test_not_yaml_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not valid YAML"):
        router("plugins: [")


def test_every_builtin_profile_loads() -> None:
    assert {"default", "gie", "approx-prefix", "precise-prefix", "power-of-two"} <= set(builtin_names())
    for name in builtin_names():
        Router(builtin_config(name))
    with pytest.raises(ValueError, match="known: "):
        builtin_config("nope")


def test_unknown_model_is_refused_503() -> None:
    r = router(PREFIX_ONLY, pool(met()))
    out = r.route(req(model="other"), NOW)
    assert isinstance(out, Refusal) and out.code == NO_ENDPOINT and "other" in out.reason


def test_a_request_with_a_subset_goes_only_to_endpoints_in_it_even_when_others_score_higher() -> None:
    r = router(PREFIX_ONLY, pool(met(), met(waiting=4), met(waiting=3)))  # e0 idle: the best everywhere
    out = r.route(req(subset=frozenset({"e1", "e2"})), NOW)
    assert isinstance(out, Decision) and out.endpoint == "e2" and set(out.endpoints) <= {"e1", "e2"}


@pytest.mark.parametrize("subset", [frozenset(), frozenset({"elsewhere"})])
def test_a_subset_with_no_endpoint_of_the_pool_is_refused_503(subset: frozenset[str]) -> None:
    r = router(PREFIX_ONLY, pool(met(), met()))
    out = r.route(req(subset=subset), NOW)
    assert isinstance(out, Refusal) and out.code == NO_ENDPOINT and "subset" in out.reason
    assert r.state.in_flight() == 0


def test_sheddable_request_is_shed_429_when_the_pool_is_saturated_others_still_routed() -> None:
    r = router(PREFIX_ONLY, pool(met(waiting=9), met(kv=0.95)))
    shed = r.route(req("s", priority=-1), NOW)
    assert isinstance(shed, Refusal) and shed.code == SHED and "saturated" in shed.reason
    assert isinstance(r.route(req("c", priority=0), NOW), Decision)


@pytest.mark.parametrize("waiting", [6, 40, 100_000])
def test_one_endpoint_past_its_thresholds_sheds_nothing_while_the_others_have_room(waiting: int) -> None:
    # GIE's unclamped mean would shed here once one queue passed 5 x the pool size (3 idle endpoints: 20)
    r = router(PREFIX_ONLY, pool(met(waiting=waiting), met(), met(), met()))
    assert isinstance(r.route(req("s", priority=-1), NOW), Decision)


def test_a_pool_with_every_endpoint_full_sheds_whatever_the_mix_of_queue_and_cache() -> None:
    r = router(PREFIX_ONLY, pool(met(waiting=6), met(kv=0.81), met(waiting=100_000, kv=1.0)))
    assert isinstance(out := r.route(req("s", priority=-1), NOW), Refusal) and out.code == SHED


def test_a_pool_at_exactly_its_thresholds_still_admits_sheddable_requests() -> None:
    # saturated means queue > 5 or KV > 0.8 (the spec, the saturation filter, flow control's headroom): at 5 / 0.8
    # every endpoint still has room
    r = router(PREFIX_ONLY, pool(met(waiting=5), met(kv=0.8), met(waiting=5, kv=0.8)))
    assert isinstance(r.route(req("s", priority=-1), NOW), Decision)


def test_filters_emptying_the_pool_refuse_with_each_filters_reason() -> None:
    state = pool(met(ts=NOW - 5), met(ts=NOW - 5))
    r = Router(builtin_config("default"), state)
    out = r.route(req(), NOW)
    assert isinstance(out, Refusal) and out.code == NO_ENDPOINT
    assert "stale-metrics-filter" in out.reason and "older than 200 ms" in out.reason
    assert out.results["default"].reports[0].dropped == ("e0", "e1")


def test_a_decision_is_remembered_so_the_next_same_prefix_request_sticks() -> None:
    r = router(PREFIX_ONLY, pool(met(), met(), met()))
    first = r.route(req("a", tokens=320, seed=1), NOW)
    assert isinstance(first, Decision)
    for i in range(5):
        again = r.route(req(f"b{i}", tokens=320, seed=1), NOW)
        assert isinstance(again, Decision) and again.endpoint == first.endpoint


def test_commit_counts_in_flight_until_first_token_and_finish_idempotently() -> None:
    r = router(PREFIX_ONLY, pool(met(), met()))
    d = r.route(req("a", tokens=320, seed=1), NOW)
    assert isinstance(d, Decision)
    st = r.state.endpoints[d.endpoint]
    assert (st.inflight_requests, st.inflight_tokens) == (1, 320)
    r.first_token("a")
    r.first_token("a")
    assert (st.inflight_requests, st.inflight_tokens) == (1, 0)
    r.finished("a")
    r.finished("a")
    assert (st.inflight_requests, st.inflight_tokens) == (0, 0)
    second = r.route(req("b", tokens=320, seed=1), NOW)
    assert isinstance(second, Decision) and r.state.endpoints[second.endpoint].inflight_tokens == 0  # all cached


def test_the_assumed_state_insertion_waits_for_flush_or_the_next_decision() -> None:
    r = router(PREFIX_ONLY, pool(met(), met()))
    r.route(req("a", tokens=320), NOW)
    assert len(r.state.approx) == 0
    r.flush()
    assert len(r.state.approx) == 20
    r.flush()
    assert r.state.approx.entries() == 20


def test_route_without_commit_changes_nothing() -> None:
    r = router(PREFIX_ONLY, pool(met(), met()))
    r.route(req("a", tokens=320), NOW, commit=False)
    assert r.state.in_flight() == 0 and len(r.state.approx) == 0


def test_kv_events_drive_the_precise_index() -> None:
    precise = "{type: prefix-cache-scorer, parameters: {source: precise}}"
    yaml = PREFIX_ONLY.replace("{type: prefix-cache-scorer}", precise)
    r = router(yaml, pool(met(), met()))
    request = req("a", tokens=64, seed=3)
    from shared.core.kv_events import chain_hashes

    hashes = chain_hashes(list(request.token_ids or ()), 16)
    r.apply_kv_events("e1", KVEventBatch(ts=NOW, events=[BlockStored(hashes, None, [], 16)]))
    assert r.route(request, NOW, commit=False).endpoint == "e1"  # type: ignore[union-attr]
    r.apply_kv_events("e1", KVEventBatch(ts=NOW, events=[BlockRemoved(hashes[:1])]))
    assert r.state.precise.match(hashes, 0b11) == {}
    r.apply_kv_events("e0", KVEventBatch(ts=NOW, events=[BlockStored(hashes, None, [], 16), AllBlocksCleared()]))
    assert len(r.state.precise) == 3  # e1 still holds blocks 1..3; e0 cleared
    assert r.apply_kv_events("unknown", KVEventBatch(ts=NOW, events=[AllBlocksCleared()])) == 0




def test_pd_handler_disaggregates_long_uncached_prompts_only() -> None:
    state = pool(met(), met(), roles=(NodeRole.PREFILL, NodeRole.DECODE))
    r = router(PD, state)
    long = r.route(req("l", tokens=320, seed=1), NOW)
    assert isinstance(long, Decision) and (long.endpoint, long.prefill) == ("e1", "e0")
    assert state.endpoints["e0"].inflight_tokens == 320 and state.endpoints["e1"].inflight_requests == 1
    r.first_token("l")
    assert state.endpoints["e0"].inflight_requests == 0
    short = r.route(req("s", tokens=64, seed=2), NOW)
    assert isinstance(short, Decision) and short.prefill is None


def test_pd_over_mixed_endpoints_choosing_one_endpoint_for_both_legs_books_it_once() -> None:
    state = pool(met(waiting=0), met(waiting=3), roles=(NodeRole.MIXED, NodeRole.MIXED))
    r = router(PD, state)
    out = r.route(req("q", tokens=1000, seed=1), NOW)
    assert isinstance(out, Decision) and (out.endpoint, out.prefill) == ("e0", None)
    assert (state.endpoints["e0"].inflight_requests, state.endpoints["e0"].inflight_tokens) == (1, 1000)


@pytest.mark.parametrize(("first_token", "blamed"), [(False, "e0"), (True, "e1")])
def test_a_pd_request_that_fails_is_blamed_on_the_leg_it_failed_in(first_token: bool, blamed: str) -> None:
    # before its first token the prefill endpoint had not finished its part; after it, the decode endpoint failed
    state = pool(met(), met(), roles=(NodeRole.PREFILL, NodeRole.DECODE))
    r = router(PD, state)
    out = r.route(req("l", tokens=320, seed=1), NOW)
    assert isinstance(out, Decision) and (out.endpoint, out.prefill) == ("e1", "e0")
    if first_token:
        r.first_token("l")
    r.finished("l", ok=False)
    assert {eid for eid, st in state.endpoints.items() if st.failed_at is not None} == {blamed}
    assert state.in_flight() == 0


def test_shadow_profile_scores_without_acting_and_exports_disagreement() -> None:
    yaml = """
plugins:
  - {type: queue-scorer}
  - {type: kv-cache-utilization-scorer}
profiles:
  - {name: by-queue, plugins: [{ref: queue-scorer}]}
  - {name: by-kv, plugins: [{ref: kv-cache-utilization-scorer}]}
handler: {type: single, parameters: {profile: by-queue}}
shadow: [by-kv]
"""
    r = router(yaml, pool(met(waiting=0, kv=0.9), met(waiting=4, kv=0.1)))
    out = r.route(req("a"), NOW)
    assert isinstance(out, Decision) and out.endpoint == "e0"
    stats = r.shadow_stats["by-kv"].export()
    assert stats["disagreement_rate"] == 1.0
    assert stats["score_delta_mean"] == pytest.approx(0.9 - 0.1)
    assert r.state.endpoints["e1"].inflight_requests == 0


@pytest.mark.parametrize("prefilled", [False, True])
def test_a_request_moved_to_a_fallback_carries_its_load_there(prefilled: bool) -> None:
    st = pool(met(), met())
    st.dispatched("r", "e0", 100, NOW)
    if prefilled:
        st.first_token("r")
    assert st.moved("r", "e1")
    a, b = st.endpoints["e0"], st.endpoints["e1"]
    assert (a.inflight_requests, a.inflight_tokens) == (0, 0)
    assert (b.inflight_requests, b.inflight_tokens) == (1, 0 if prefilled else 100)
    st.finished("r")
    assert (b.inflight_requests, b.inflight_tokens) == (0, 0)


@pytest.mark.parametrize(("rid", "to"), [("unknown", "e1"), ("r", "nowhere"), ("r", "e0")])
def test_moving_an_unknown_request_or_to_an_unknown_or_same_endpoint_changes_nothing(rid: str, to: str) -> None:
    st = pool(met(), met())
    st.dispatched("r", "e0", 10, NOW)
    assert not st.moved(rid, to)
    assert st.endpoints["e0"].inflight_requests == 1 and st.endpoints["e1"].inflight_requests == 0


@pytest.mark.parametrize(("profile", "fallback"), [("precise-prefix", True), ("default", False),
                                                   ("approx-prefix", False)])
def test_only_a_hybrid_index_smaller_than_the_decision_memory_falls_back_on_it(profile: str, fallback: bool) -> None:
    r = Router(builtin_config(profile))
    assert r.state.hybrid_fallback is fallback
    assert r.state.track_approx is (fallback or profile == "approx-prefix")


def test_a_request_whose_end_is_never_reported_stops_loading_its_endpoint_after_the_max_age() -> None:
    r = router(PREFIX_ONLY, pool(met()))
    r.route(req("lost", tokens=64), NOW)
    r.route(req("young", tokens=64), NOW + 50)
    assert r.expire_flights(NOW + 60, max_age_s=30, keep=100) == ["lost"]
    assert r.state.in_flight() == 1 and r.state.endpoints["e0"].inflight_requests == 1
    r.finished("lost")  # its end, reported late, changes nothing
    assert r.state.endpoints["e0"].inflight_requests == 1


def test_after_the_clock_steps_back_lost_requests_still_stop_loading_their_endpoint_a_max_age_later() -> None:
    r = router(PREFIX_ONLY, pool(met(ts=NOW + 3600)))
    r.state.dispatched("before-step", "e0", 16, NOW + 3600)  # the clock ran an hour fast, then NTP stepped it back
    for i in range(10):
        r.state.dispatched(f"after-step-{i}", "e0", 16, NOW + i)
    assert r.expire_flights(NOW + 10 + 60, max_age_s=30, keep=100) == [
        "before-step", *(f"after-step-{i}" for i in range(10))]
    assert r.state.endpoints["e0"].inflight_requests == 0


def test_past_the_in_flight_bound_the_oldest_requests_are_let_go_first() -> None:
    r = router(PREFIX_ONLY, pool(met()))
    for i in range(5):
        r.route(req(f"r{i}", tokens=16), NOW + i)
    assert r.expire_flights(NOW + 5, max_age_s=3600, keep=2) == ["r0", "r1", "r2"]
    st = r.state.endpoints["e0"]
    assert (r.state.in_flight(), st.inflight_requests) == (2, 2)


def test_a_second_request_under_an_id_in_flight_is_counted_once_and_its_ends_never_go_below_zero() -> None:
    r = router(PREFIX_ONLY, pool(met(), met()))
    r.route(req("dup", tokens=64, seed=1), NOW)
    r.route(req("dup", tokens=64, seed=2), NOW)  # another caller's request under the same id
    assert r.state.in_flight() == 1 and sum(st.inflight_requests for st in r.state.endpoints.values()) == 1
    for _ in range(3):
        r.first_token("dup")
        r.finished("dup")
    assert all((st.inflight_requests, st.inflight_tokens) == (0, 0) for st in r.state.endpoints.values())


def test_an_endpoint_leaving_with_requests_in_flight_takes_their_load_and_their_late_ends_change_nothing() -> None:
    state = pool(met(), met())
    r = router(PREFIX_ONLY, state)
    state.dispatched("on-e0", "e0", 100, NOW)
    state.dispatched("on-e1", "e1", 100, NOW)
    e0, e1 = state.endpoints["e0"].endpoint, state.endpoints["e1"].endpoint
    r.set_endpoints([e1])
    assert not state.moved("on-e1", "e0")  # a fallback to the endpoint that left is not followed
    r.first_token("on-e0")
    r.finished("on-e0")
    assert state.in_flight() == 1 and (state.endpoints["e1"].inflight_requests, state.endpoints["e1"].inflight_tokens) \
        == (1, 100)
    r.set_endpoints([e0, e1])  # it comes back: with nothing in flight, nothing negative
    assert (state.endpoints["e0"].inflight_requests, state.endpoints["e0"].inflight_tokens) == (0, 0)


def test_many_endpoints_leaving_drop_their_flights_in_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    # one pass over the flights per endpoint leaving: 0.22 s for 200 endpoints with 100,000 in flight
    from shared.core.routing.domain import Endpoint

    r = router(PREFIX_ONLY, pool(*(met() for _ in range(200))))
    for i in range(2_000):
        r.state.dispatched(f"r{i}", f"e{i % 200}", 1, NOW)
    passes: list[set[str]] = []
    drop = r.state._drop_flights

    def counted(gone: set[str]) -> None:
        passes.append(gone)
        drop(gone)

    monkeypatch.setattr(r.state, "_drop_flights", counted)
    r.state.set_endpoints([Endpoint(id="e0", model="m")])
    assert len(passes) == 1 and len(passes[0]) == 199
    assert r.state.in_flight() == 10 and list(r.state.endpoints) == ["e0"]


def _share_of_cold_prompts_to_a_broken_engine(how: str, seed: int) -> float:
    """Three engines; e0 fails every request at once ("error": the caller hears a failed end; "refused": the proxy
    moves the request to the next endpoint of the list) while its reports say nothing runs there; e1 and e2 take
    1 s a request. Cold prompts at 20/s for 20 s; the share whose first choice was e0."""
    import heapq
    import random

    from shared.core.routing import Endpoint, EndpointMetrics, RouteRequest

    rng = random.Random(seed)
    r = Router(builtin_config("default"), seed=seed)
    r.set_endpoints([Endpoint(id=f"e{i}", model="m", num_gpu_blocks=3200) for i in range(3)])
    running = {"e0": 0, "e1": 0, "e2": 0}
    ends: list[tuple[float, str, str]] = []
    t = report = 0.0
    picks = to_broken = 0
    while t < 20.0:
        t += rng.expovariate(20.0)
        while ends and ends[0][0] <= t:
            _, rid, ep = heapq.heappop(ends)
            r.finished(rid, ok=True)
            running[ep] -= 1
        while report <= t:  # every engine reports every 50 ms, e0 truthfully: nothing running
            for ep, n in running.items():
                r.update_metrics(ep, EndpointMetrics(ts=report, running=n, kv_usage=min(n / 64, 1)))
            report += 0.05
        rid = f"r{picks}"
        picks += 1
        out = r.route(RouteRequest(rid, "m", token_ids=[rng.randrange(1 << 30) for _ in range(512)]), t)
        assert isinstance(out, Decision)
        ep = out.endpoint
        if ep == "e0":
            to_broken += 1
            if how == "error":
                r.finished(rid, ok=False)
                continue
            ep = out.endpoints[1]
            r.state.moved(rid, ep)
        r.first_token(rid)
        running[ep] += 1
        heapq.heappush(ends, (t + 1.0, rid, ep))
    return to_broken / picks


def test_an_engine_that_failed_once_gets_cold_prompts_again_after_the_hold() -> None:
    # only a success of a request placed there could clear the mark, and the idle rule would place none there while
    # another endpoint is idle: at light load one failure would keep it from every cold prompt for good
    import random

    from shared.core.routing import Endpoint, RouteRequest
    from shared.core.routing.domain import FAILED_HOLD_S

    rng = random.Random(0)
    r = Router(builtin_config("default"), seed=0)
    r.set_endpoints([Endpoint(id=f"e{i}", model="m", num_gpu_blocks=3200) for i in range(4)])
    t, taken = 0.0, 0
    for k in range(200):  # one cold prompt every 0.5 s, each done before the next: every endpoint idle
        for i in range(4):
            r.update_metrics(f"e{i}", EndpointMetrics(ts=t))
        out = r.route(RouteRequest(f"r{k}", "m", token_ids=[rng.randrange(1 << 30) for _ in range(512)]), t)
        assert isinstance(out, Decision)
        if k == 0:
            r.state.dispatched("boom", "e0", 10, t)
            r.finished("boom", ok=False)  # e0 failed once, then works
        elif out.endpoint == "e0" and t > FAILED_HOLD_S:
            taken += 1
        r.finished(f"r{k}", ok=True)
        t += 0.5
    assert taken >= 200 // 4 // 2  # about its share (recency spreads a quarter each) once the hold lapsed


@pytest.mark.parametrize("how", ["error", "refused"])
def test_an_engine_that_fails_every_request_at_once_draws_no_more_than_its_share_of_cold_prompts(how: str) -> None:
    # It is never busy, so it would look idle to the no-hit scorer's idle rule and draw nearly every cold prompt
    # (90 % with an error answer, 99 % refusing connections, before failures were reported to the core).
    shares = [_share_of_cold_prompts_to_a_broken_engine(how, seed) for seed in range(2)]
    assert max(shares) < 0.4, shares


def _warm_on_e0() -> tuple[Router, RouteRequest]:
    """Three endpoints, e0 holding the prompt's prefix (its KV events): the prompt's first choice is e0."""
    state = pool(met(), met(), met())
    r = Router(builtin_config("default"), state)
    q = req("warm", tokens=512, seed=3)
    chain = r.route(q, NOW, commit=False)  # (the chain of block hashes the router computes for it)
    assert isinstance(chain, Decision)
    hashes = list(r.last_cycle.chain.all()) if r.last_cycle is not None else []
    state.apply_kv_events("e0", KVEventBatch(ts=NOW, events=[
        BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=[], block_size=16)]))
    return r, q


def _fail_on(r: Router, endpoint: str, times: int, now: float) -> None:
    for k in range(times):
        r.state.dispatched(f"x{endpoint}{k}{now}", endpoint, 10, now)
        r.finished(f"x{endpoint}{k}{now}", ok=False)


@pytest.mark.parametrize(("failures", "first"), [(0, "e0"), (2, "e0"), (3, "e1-or-e2")])
def test_an_endpoint_whose_last_three_requests_failed_takes_no_request_for_the_hold(failures: int, first: str) -> None:
    r, q = _warm_on_e0()
    _fail_on(r, "e0", failures, NOW)
    out = r.route(q, NOW)
    assert isinstance(out, Decision)
    assert out.endpoint == "e0" if first == "e0" else "e0" not in out.endpoints  # even holding the prefix


def test_a_broken_endpoint_is_tried_again_once_the_hold_lapses_and_leads_after_a_success() -> None:
    from shared.core.routing.domain import FAILED_HOLD_S

    r, q = _warm_on_e0()
    _fail_on(r, "e0", 3, NOW)
    later = NOW + FAILED_HOLD_S
    for eid in ("e0", "e1", "e2"):
        r.update_metrics(eid, EndpointMetrics(ts=later))
    probe = r.route(RouteRequest("probe", "m", token_ids=q.token_ids), later)
    assert isinstance(probe, Decision) and probe.endpoint == "e0"
    r.finished("probe", ok=True)
    assert r.state.endpoints["e0"].fail_streak == 0 and not r.state.streaking


def test_when_every_endpoint_is_broken_the_pool_is_left_whole() -> None:
    state = pool(met(), met())
    r = Router(builtin_config("default"), state)
    for eid in ("e0", "e1"):
        _fail_on(r, eid, 3, NOW)
    assert state.streaking == {"e0", "e1"}
    assert isinstance(r.route(req("q", tokens=64), NOW), Decision)


def test_a_removed_endpoint_leaves_the_failure_streak_set() -> None:
    state = pool(met(), met())
    r = Router(builtin_config("default"), state)
    _fail_on(r, "e0", 3, NOW)
    state.remove("e0")
    assert not state.streaking


FLOW_CAP_2 = """
plugins: [{type: queue-scorer}]
flow_control: {enabled: true, max_inflight_per_endpoint: 2}
"""


def test_a_broken_endpoint_does_not_keep_the_flow_control_gate_open_for_the_others() -> None:
    r = router(FLOW_CAP_2, pool(met(), met(), met(), met()))
    _fail_on(r, "e0", 3, NOW)  # e0 takes nothing for the hold, and has all the room in the world
    for i in range(50):
        r.submit(req(f"r{i}"), NOW)
    assert all(r.state.endpoints[e].inflight_requests <= 2 for e in ("e1", "e2", "e3"))
    assert r.state.endpoints["e0"].inflight_requests == 0 and r.queued() == 50 - 6


def test_a_clock_step_back_does_not_keep_a_broken_endpoint_out_for_the_steps_length() -> None:
    r = router("plugins: [{type: queue-scorer}]\n", pool(met(), met()))
    t0 = 1_000_000.0
    _fail_on(r, "e0", 3, t0)
    for dt in (60.0, 1800.0):  # after the wall clock stepped back an hour
        now = t0 - 3600.0 + dt
        for e in ("e0", "e1"):
            r.update_metrics(e, met(ts=now))
        assert not r.state.endpoints["e0"].broken(now)
        assert [st.id for st in r.state.working(r.state.pool("m"), now)] == ["e0", "e1"]


def test_a_failure_is_dated_by_the_callers_clock_when_it_gives_one() -> None:
    r = router("plugins: [{type: queue-scorer}]\n", pool(met(), met()))
    r.state.dispatched("slow", "e0", 10, NOW)  # dispatched at NOW, timed out a minute later
    r.finished("slow", ok=False, now=NOW + 60)
    assert r.state.endpoints["e0"].failing(NOW + 65) and not r.state.endpoints["e0"].failing(NOW + 75)


def test_a_streak_counts_failures_within_the_hold_of_each_other_only() -> None:
    from shared.core.routing.domain import FAILED_HOLD_S

    r = router("plugins: [{type: queue-scorer}]\n", pool(met(), met()))
    for k in range(3):  # three failures, each past the hold of the one before
        r.state.dispatched(f"f{k}", "e0", 10, NOW)
        r.finished(f"f{k}", ok=False, now=NOW + k * (FAILED_HOLD_S + 1))
    assert r.state.endpoints["e0"].fail_streak == 1 and not r.state.streaking


def test_failing_requests_cannot_leave_more_than_half_a_pool_out() -> None:
    n = 8
    r = Router(builtin_config("default"), pool(*(met() for _ in range(n))), seed=0)
    for e in r.state.endpoints:
        _fail_on(r, e, 3, NOW)  # a stranger whose requests fail at once, on every engine
    out = r.route(req("legit", tokens=64), NOW)
    assert isinstance(out, Decision)
    assert len(r.state.working(r.state.pool("m"), NOW)) == n // 2
    assert len(r.state.working(r.state.pool("m")[:1], NOW)) == 1  # a pool of one is never emptied


def test_a_pd_model_whose_decode_endpoints_are_all_broken_is_still_served() -> None:
    state = pool(met(), met(), roles=(NodeRole.PREFILL, NodeRole.DECODE))
    r = router(PD, state)
    for i in range(3):  # short prompts (no prefill leg) failed on the only decode endpoint
        out = r.route(req(f"f{i}", tokens=32, seed=i), NOW)
        assert isinstance(out, Decision) and (out.endpoint, out.prefill) == ("e1", None)
        r.finished(f"f{i}", ok=False, now=NOW)
    assert state.endpoints["e1"].broken(NOW)
    for i, n in enumerate((32, 320)):
        assert isinstance(r.route(req(f"n{i}", tokens=n, seed=50 + i), NOW), Decision)


def test_an_endpoint_whose_hold_lapsed_leaves_the_streak_set_so_routes_pay_one_set_test_again() -> None:
    from shared.core.routing.domain import FAILED_HOLD_S

    r = router("plugins: [{type: queue-scorer}]\n", pool(met(), met(), met()))
    _fail_on(r, "e0", 3, NOW)
    whole = r.state.pool("m")
    assert len(r.state.working(whole, NOW)) == 2 and r.state.streaking == {"e0"}
    assert r.state.working(whole, NOW + FAILED_HOLD_S + 1) is whole and not r.state.streaking
    r.state.dispatched("again", "e0", 10, NOW + FAILED_HOLD_S + 2)
    r.finished("again", ok=False, now=NOW + FAILED_HOLD_S + 2)  # one failure after the hold: a new streak of 1
    assert r.state.endpoints["e0"].fail_streak == 1 and not r.state.streaking


# -- failures shared between router replicas (the gateway's picker replicas) --------------------------------------

def _replicas(n: int) -> list[Router]:
    out = [router("plugins: [{type: queue-scorer}]\n", pool(met(), met(), met())) for _ in range(n)]
    for r in out:
        r.state.share_outcomes()
    return out


def _tell(src: Router, dst: Router, now: float) -> None:
    for eid, failed in src.state.take_outcomes():
        dst.state.peer_outcome(eid, failed, now)


def test_a_replica_keeps_each_failure_it_saw_for_its_peers() -> None:
    (r,) = _replicas(1)
    _fail_on(r, "e0", 2, NOW)
    r.state.dispatched("moved", "e1", 10, NOW)
    r.state.moved("moved", "e2", NOW)  # the proxy gave up on e1
    assert r.state.take_outcomes() == [("e0", True), ("e0", True), ("e1", True)]
    assert r.state.take_outcomes() == []  # taken once


def test_failures_at_three_replicas_leave_the_engine_out_at_each() -> None:
    rs = _replicas(3)
    for r in rs:
        _fail_on(r, "e0", 1, NOW)  # one failure at each replica: none would count it broken alone
    for src in rs:
        for dst in rs:
            if dst is not src:
                for eid, failed in list(src.state.outcomes or ()):
                    dst.state.peer_outcome(eid, failed, NOW)
    for r in rs:
        assert r.state.endpoints["e0"].broken(NOW)
        assert [st.id for st in r.state.working(r.state.pool("m"), NOW)] == ["e1", "e2"]


def test_a_peers_failure_is_not_kept_for_the_peers_again() -> None:
    a, b = _replicas(2)
    _fail_on(a, "e0", 1, NOW)
    _tell(a, b, NOW)
    assert b.state.endpoints["e0"].failing(NOW) and b.state.take_outcomes() == []


def test_a_success_after_failures_is_shared_and_clears_the_peers_streak() -> None:
    a, b = _replicas(2)
    _fail_on(a, "e0", 3, NOW)
    _tell(a, b, NOW)
    assert b.state.endpoints["e0"].broken(NOW)
    a.state.dispatched("ok", "e0", 10, NOW)
    a.finished("ok", ok=True, now=NOW)
    assert a.state.take_outcomes() == [("e0", False)]
    b.state.peer_outcome("e0", False, NOW)
    assert not b.state.endpoints["e0"].failing(NOW) and not b.state.streaking


def test_successes_on_a_healthy_engine_are_not_news() -> None:
    (r,) = _replicas(1)
    for i in range(5):
        r.state.dispatched(f"ok{i}", "e1", 10, NOW)
        r.first_token(f"ok{i}")
        r.finished(f"ok{i}", ok=True, now=NOW)
    assert r.state.take_outcomes() == []


def test_a_peers_outcome_for_an_unknown_engine_is_ignored() -> None:
    (r,) = _replicas(1)
    assert not r.state.peer_outcome("nobody", True, NOW)
    assert all(st.failed_at is None for st in r.state.endpoints.values())


def test_a_router_that_does_not_share_keeps_no_outcomes() -> None:
    r = router("plugins: [{type: queue-scorer}]\n", pool(met(), met()))
    _fail_on(r, "e0", 3, NOW)
    assert r.state.outcomes is None and r.state.take_outcomes() == []


def test_outcomes_nobody_takes_are_bounded() -> None:
    from shared.core.routing.state import OUTCOMES_KEPT

    (r,) = _replicas(1)
    _fail_on(r, "e0", OUTCOMES_KEPT + 10, NOW)
    assert len(r.state.take_outcomes()) == OUTCOMES_KEPT


def test_a_cold_lora_prompt_goes_to_the_engine_with_its_adapter_active_not_to_an_idle_one_without_it() -> None:
    for seed in range(10):
        state = pool(met(running=4, active_loras=("a",)), met(), met(), adapters=(frozenset({"a"}),) * 3, max_loras=2)
        out = Router(builtin_config("default"), state, seed=seed).route(req(f"q{seed}", 800, seed + 7, lora="a"), NOW)
        assert isinstance(out, Decision) and out.endpoint == "e0"


def test_flow_control_holds_a_subset_request_while_its_subset_has_no_room_though_others_do() -> None:
    """The gate is the pool's room; a request that may go only to part of it waits for room there (routed to its full
    endpoints past the cap, it piled onto them while the rest of the pool opened the gate)."""
    r = router(FLOW_CAP_2, pool(met(), met()))
    only_e0 = frozenset({"e0"})
    for i in range(5):
        r.submit(req(f"s{i}", subset=only_e0), NOW)
    assert r.state.endpoints["e0"].inflight_requests == 2 and r.state.endpoints["e1"].inflight_requests == 0
    assert r.queued() == 3
    assert r.dispatch(NOW) == [] and r.state.endpoints["e0"].inflight_requests == 2  # e1's room is not e0's
    r.finished("s0", ok=True, now=NOW)
    (out,) = r.dispatch(NOW)
    assert isinstance(out, Decision) and out.endpoint == "e0" and r.state.endpoints["e0"].inflight_requests == 2
