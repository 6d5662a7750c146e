"""Scorers against hand-computed values (one table per plugin)."""

from __future__ import annotations

import pytest

from shared.core.engine import CalibratedStepTime
from shared.core.routing import Endpoint
from shared.core.routing.domain import EndpointMetrics
from shared.core.routing.scorers import SCORERS
from shared.core.routing.scorers.active_requests import ActiveParams
from shared.core.routing.scorers.no_hit_lru import NoHitLruScorer, NoHitParams
from shared.core.routing.scorers.predicted_latency import LatencyParams, predicted_ttft
from shared.core.routing.scorers.prefix import PrefixParams, prefix_score
from shared.core.routing.scorers.token_load import TokenLoadParams
from shared.core.routing.state import PoolState
from tests.unit.routing.helpers import NOW, cands, cycle, met, pool, req


def score(name: str, state: object, request: object = None, params: object = None) -> list[float] | None:
    """Rounded scores; None when the scorer says every endpoint scores the same."""
    cls = SCORERS[name]
    s = cls(name, params if params is not None else cls.Params())  # type: ignore[arg-type]
    raw = s.score(cycle(state, request), cands(state))  # type: ignore[arg-type]
    return None if raw is None else [round(v, 6) for v in raw]


def test_queue_scorer_is_min_max_of_waiting() -> None:
    assert score("queue-scorer", pool(met(waiting=0), met(waiting=5), met(waiting=10))) == [1.0, 0.5, 0.0]


def test_queue_scorer_cannot_tell_equal_queues_apart_and_missing_metrics_count_as_worst() -> None:
    assert score("queue-scorer", pool(met(waiting=3), met(waiting=3))) is None
    assert score("queue-scorer", pool(met(waiting=2), None, met(waiting=4))) == [1.0, 0.0, 0.0]


def test_kv_utilization_scorer_is_one_minus_usage() -> None:
    assert score("kv-cache-utilization-scorer", pool(met(kv=0.25), met(kv=1.0), None)) == [0.75, 0.0, 0.0]


def test_running_requests_scorer_is_min_max_of_running() -> None:
    assert score("running-requests-scorer", pool(met(running=4), met(running=8), met(running=6))) == [1.0, 0.0, 0.5]


@pytest.mark.parametrize(("counts", "params", "expected"), [
    ((0, 2, 4), ActiveParams(), [1.0, 0.5, 0.0]),
    ((1, 2, 4), ActiveParams(idle_threshold=1), [1.0, 0.5, 0.0]),
    ((0, 2, 4), ActiveParams(max_busy_score=0.5), [1.0, 0.25, 0.0]),
    ((0, 0), ActiveParams(), None),
])
def test_active_request_scorer_follows_llmd(counts: tuple[int, ...], params: ActiveParams,
                                            expected: list[float] | None) -> None:
    state = pool(*(met() for _ in counts))
    for i, c in enumerate(counts):
        state.endpoints[f"e{i}"].inflight_requests = c
    assert score("active-request-scorer", state, params=params) == expected


def test_token_load_scorer_counts_in_flight_plus_this_requests_uncached_tokens() -> None:
    state = pool(met(), met())
    r = req(tokens=320, seed=2)  # 20 blocks
    state.remember("e0", cycle(state, r).chain.all()[:10])  # e0 holds 160 tokens
    state.endpoints["e1"].inflight_tokens = 680
    p = TokenLoadParams(queue_threshold_tokens=1000, source="approximate")
    assert score("token-load-scorer", state, r, p) == [1 - 160 / 1000, 1 - (680 + 320) / 1000]


@pytest.mark.parametrize(("matched", "total", "w", "expected"), [
    (5, 10, 0.0, 0.5),
    (0, 10, 0.0, 0.0),
    (10, 10, 0.0, 1.0),
    (256, 512, 0.5, 0.5 * 0.5 ** 2 + 0.5 * 0.5),  # 4096 of 8192 tokens: length term 0.5² ...
    (1024, 1024, 1.0, 1.0),
])
def test_prefix_score_formula(matched: int, total: int, w: float, expected: float) -> None:
    assert prefix_score(matched, total, 16, w, 8192) == pytest.approx(expected)


def test_prefix_scorer_reads_the_chosen_index() -> None:
    state = pool(met(), met(), met())
    r = req(tokens=160, seed=4)
    hashes = cycle(state, r).chain.all()
    state.remember("e0", hashes[:5])
    state.precise.add(state.endpoints["e1"].slot, hashes)
    assert score("prefix-cache-scorer", state, r, PrefixParams(source="approximate")) == [0.5, 0.0, 0.0]
    assert score("prefix-cache-scorer", state, r, PrefixParams(source="precise")) == [0.0, 1.0, 0.0]
    assert score("prefix-cache-scorer", state, r, PrefixParams(source="hybrid")) == [0.5, 1.0, 0.0]
    assert score("prefix-cache-scorer", state, req(), PrefixParams()) is None  # nothing to hash
    assert score("prefix-cache-scorer", state, req(tokens=160, seed=5), PrefixParams()) is None  # no match anywhere


def test_hybrid_falls_back_on_the_decision_memory_when_no_engine_reports_the_prompt() -> None:
    state = pool(met(), met(), met())
    r = req(tokens=160, seed=4)
    state.track_speculative = False  # the recent-decision window has moved past this decision
    state.remember("e0", cycle(state, r).chain.all()[:5])
    hybrid = PrefixParams(source="hybrid")
    assert score("prefix-cache-scorer", state, r, hybrid) is None  # no fallback: nothing known anywhere
    state.hybrid_fallback = True
    assert score("prefix-cache-scorer", state, r, hybrid) == [0.5, 0.0, 0.0]


def test_hybrid_fallback_yields_to_an_engine_that_reports_the_prompt() -> None:
    state = pool(met(), met(), met())
    r = req(tokens=160, seed=4)
    hashes = cycle(state, r).chain.all()
    state.track_speculative = False
    state.remember("e0", hashes)  # sent to e0 long ago; e0 evicted it since, e1 computed it
    state.precise.add(state.endpoints["e1"].slot, hashes[:4])
    state.hybrid_fallback = True
    assert score("prefix-cache-scorer", state, r, PrefixParams(source="hybrid")) == [0.0, 0.4, 0.0]


def test_lora_affinity_table() -> None:
    state = pool(met(active_loras=("a",)), met(active_loras=("b",)), met(active_loras=("b", "c"), waiting_loras=("a",)),
                 met(active_loras=("b", "c")), None, max_loras=2)
    assert score("lora-affinity-scorer", state, req(lora="a")) == [1.0, 0.8, 0.6, 0.0, 0.0]
    assert score("lora-affinity-scorer", state, req()) is None


def test_no_hit_lru_spreads_cold_requests_and_is_neutral_for_warm_ones() -> None:
    from shared.core.routing.scorers.no_hit_lru import NoHitLruScorer

    state = pool(met(), met(), met())
    s = NoHitLruScorer("n", NoHitParams(source="approximate"))
    cold = cycle(state, req(tokens=32, seed=9))
    assert s.score(cold, cands(state)) is None  # nobody took a cold request yet
    s.picked(cold, state.endpoints["e1"])
    s.picked(cold, state.endpoints["e0"])
    assert list(s.score(cold, cands(state))) == [0.0, 1.0, 1.0]  # e2 never used; e1 least recent; e0 most recent
    state.remember("e2", cold.chain.all())
    warm = cycle(state, req(tokens=32, seed=9))
    assert s.score(warm, cands(state)) is None  # neutral 0.5 everywhere


def test_no_hit_lru_with_cold_below_treats_a_shared_template_block_as_cold() -> None:
    from shared.core.routing.domain import RouteRequest
    from shared.core.routing.scorers.no_hit_lru import NoHitLruScorer

    state = pool(met(), met(), met())
    template = [7] * 16  # one block every chat prompt shares

    def chat(group: int) -> RouteRequest:
        return RouteRequest(f"g{group}", "m", token_ids=template + [group * 1000 + i for i in range(144)])

    first = cycle(state, chat(1))
    state.remember("e0", first.chain.all())  # e0 holds group 1, so the template block too
    llm_d = NoHitLruScorer("n", NoHitParams(source="approximate"))
    ours = NoHitLruScorer("n", NoHitParams(source="approximate", cold_below=0.3))
    for s in (llm_d, ours):
        s.picked(cycle(state), state.endpoints["e1"])  # a cold request went to e1 earlier
        s.picked(cycle(state), state.endpoints["e0"])  # and then one to e0
    new_group = cycle(state, chat(2))  # 1 of its 10 blocks is cached on e0: warm for llm-d's rule
    assert llm_d.score(new_group, cands(state)) is None
    assert list(ours.score(new_group, cands(state))) == [0.0, 1.0, 1.0]  # spread: e0 took the last cold one
    assert ours.score(cycle(state, chat(1)), cands(state)) is None  # group 1 itself is warm (10 of 10)


@pytest.mark.parametrize(("holder", "prefer", "expected"), [
    ("e1", True, [0.5, 1.0, 0.0]),  # e1 shares a leading block with the new group: it leads
    ("e1", False, [1.0, 0.5, 0.0]),  # plain recency (llm-d)
    ("e2", True, [1.0, 0.5, 0.0]),  # the holder took the last cold request itself: spreading wins
])
def test_no_hit_lru_prefers_a_partial_holder_unless_it_took_the_last_cold_request(
        holder: str, prefer: bool, expected: list[float]) -> None:
    from shared.core.routing.domain import RouteRequest
    from shared.core.routing.scorers.no_hit_lru import NoHitLruScorer

    state = pool(met(), met(), met())
    family = [7] * 16  # the one leading block a family of prompts shares

    def chat(group: int) -> RouteRequest:
        return RouteRequest(f"g{group}", "m", token_ids=family + [group * 1000 + i for i in range(144)])

    state.remember(holder, cycle(state, chat(1)).chain.all())
    s = NoHitLruScorer("n", NoHitParams(source="approximate", cold_below=0.3, prefer_partial=prefer))
    for eid in ("e0", "e1", "e2"):  # each took a cold request: e0 least recently, e2 last
        s.picked(cycle(state), state.endpoints[eid])
    assert list(s.score(cycle(state, chat(2)), cands(state))) == expected  # group 2: 1 of 10 blocks cached: cold


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_no_hit_lru_cold_below_is_a_fraction(bad: float) -> None:
    from shared.core.routing.scorers.no_hit_lru import NoHitLruScorer

    assert NoHitLruScorer.check(NoHitParams(cold_below=bad))


def test_predicted_latency_uses_each_endpoints_own_gpu_model() -> None:
    state = pool(met(), met())
    fast, slow = CalibratedStepTime(base_s=0.0, per_token_s=1e-4), CalibratedStepTime(base_s=0.0, per_token_s=4e-4)
    state.upsert(Endpoint(id="e0", model="m", max_num_batched_tokens=1000), slow)
    state.upsert(Endpoint(id="e1", model="m", max_num_batched_tokens=1000), fast)
    r = req(tokens=1000, seed=5)
    c = cycle(state, r)
    # rate = 1000 tokens / (1000 × per_token): 2,500 and 10,000 tok/s; TTFT = 1000 / rate
    assert predicted_ttft(c, state.endpoints["e0"], "hybrid") == pytest.approx(0.4)
    assert predicted_ttft(c, state.endpoints["e1"], "hybrid") == pytest.approx(0.1)
    assert score("predicted-latency-scorer", state, r, LatencyParams()) == [0.25, 1.0]


def test_predicted_latency_halves_endpoints_missing_the_slo() -> None:
    state = pool(met(), met())
    state.endpoints["e1"].inflight_tokens = 15_928  # one more second of prefill at the default rate
    r = req(tokens=1600, seed=5, slo_ttft_s=0.5)
    got = score("predicted-latency-scorer", state, r)
    assert got is not None and got[0] == 1.0 and got[1] == pytest.approx(0.5 * 1600 / (1600 + 15_928), abs=1e-6)


def test_no_hit_lru_does_not_prefer_a_partial_holder_whose_cache_is_nearly_full() -> None:
    from shared.core.routing.domain import RouteRequest
    from shared.core.routing.scorers.no_hit_lru import NoHitLruScorer

    state = pool(met(), met(), met())
    family = [7] * 16

    def chat(group: int) -> RouteRequest:
        return RouteRequest(f"g{group}", "m", token_ids=family + [group * 1000 + i for i in range(144)])

    for i in range(3):  # engines of 100 KV blocks
        state.upsert(Endpoint(id=f"e{i}", model="m", num_gpu_blocks=100))
    state.remember("e1", cycle(state, chat(1)).chain.all())
    e1 = state.endpoints["e1"]
    state.precise.add(e1.slot, list(range(10**6, 10**6 + 90)))  # its KV events: 90 of its 100 blocks cached
    s = NoHitLruScorer("n", NoHitParams(source="approximate", cold_below=0.3))
    for eid in ("e0", "e1", "e2"):
        s.picked(cycle(state), state.endpoints[eid])
    assert list(s.score(cycle(state, chat(2)), cands(state))) == [1.0, 0.5, 0.0]  # plain recency: spreading wins


@pytest.mark.parametrize("room", [0.0, -0.5, 1.5])
def test_no_hit_lru_partial_room_is_a_fraction(room: float) -> None:
    from shared.core.routing.scorers.no_hit_lru import NoHitLruScorer

    assert NoHitLruScorer.check(NoHitParams(partial_room=room))


def _cold_pool_with_recency() -> tuple[PoolState, NoHitLruScorer]:
    """Three endpoints that each took a cold request (e0 least recently, e2 last) and a cold prompt."""
    state = pool(met(), met(), met())
    s = NoHitLruScorer("n", NoHitParams(source="approximate", cold_below=0.3))
    for eid in ("e0", "e1", "e2"):
        s.picked(cycle(state), state.endpoints[eid])
    return state, s


@pytest.mark.parametrize(("busy", "expected"), [
    # e0 (least recent) has a request in flight from this router: idle e1 and e2 lead, in recency order
    ({"e0": (1, met())}, [0.4, 0.8, 0.6]),
    # e0's own count is zero but its last report shows a request running (another replica's): not idle
    ({"e0": (0, met(running=1))}, [0.4, 0.8, 0.6]),
    # ... or waiting
    ({"e0": (0, met(waiting=2)), "e1": (2, met())}, [0.4, 0.2, 0.6]),
])
def test_no_hit_lru_sends_a_cold_request_to_an_idle_endpoint_first(
        busy: dict[str, tuple[int, EndpointMetrics]], expected: list[float]) -> None:
    state, s = _cold_pool_with_recency()
    for eid, (inflight, m) in busy.items():
        state.endpoints[eid].inflight_requests = inflight
        state.update_metrics(eid, m)
    got = s.score(cycle(state, req(tokens=160, seed=4)), cands(state))
    assert got == pytest.approx(expected)
    idle = [v for eid, v in zip(("e0", "e1", "e2"), got, strict=True) if eid not in busy]
    assert min(idle) > max(v for eid, v in zip(("e0", "e1", "e2"), got, strict=True) if eid in busy)


@pytest.mark.parametrize(("metrics", "expected"), [
    # e0 runs a request with the adapter active; e1 and e2 idle without it: no idle lead (they would load it first)
    ((met(running=1, active_loras=("a",)), met(), met()), [1.0, 0.5, 0.0]),
    # e0 busy with it, e2 idle with it: e2 alone leads
    ((met(running=1, active_loras=("a",)), met(), met(active_loras=("a",))), [0.4, 0.2, 0.6]),
    # nobody has it active: every engine would load it, so idleness alone decides (e0 busy)
    ((met(running=1), met(), met()), [0.4, 0.8, 0.6]),
])
def test_no_hit_lru_gives_a_lora_request_the_idle_lead_only_where_its_adapter_is_active(
        metrics: tuple[EndpointMetrics, ...], expected: list[float]) -> None:
    state, s = _cold_pool_with_recency()
    for eid, m in zip(("e0", "e1", "e2"), metrics, strict=True):
        state.update_metrics(eid, m)
    assert s.score(cycle(state, req(tokens=160, seed=4, lora="a")), cands(state)) == pytest.approx(expected)


@pytest.mark.parametrize("busy", [("e0", "e1", "e2"), ()])
def test_no_hit_lru_is_recency_alone_when_all_endpoints_are_busy_or_all_idle(busy: tuple[str, ...]) -> None:
    state, s = _cold_pool_with_recency()
    for eid in busy:
        state.endpoints[eid].inflight_requests = 1
    assert list(s.score(cycle(state, req(tokens=160, seed=4)), cands(state))) == [1.0, 0.5, 0.0]


def test_no_hit_lru_an_idle_endpoint_leads_even_when_it_took_the_last_cold_request() -> None:
    state = pool(met(running=1), met())
    s = NoHitLruScorer("n", NoHitParams(source="approximate", cold_below=0.3))
    for eid in ("e0", "e1"):  # e1 took the last cold prompt and is done; e0 still runs its own
        s.picked(cycle(state), state.endpoints[eid])
    state.endpoints["e0"].inflight_requests = 1
    got = s.score(cycle(state, req(tokens=160, seed=4)), cands(state))
    assert got is not None and got[1] > got[0]


@pytest.mark.parametrize("how", ["error answer", "moved away by the proxy"])
def test_no_hit_lru_gives_no_idle_lead_to_an_endpoint_whose_last_request_failed(how: str) -> None:
    state, s = _cold_pool_with_recency()
    state.endpoints["e1"].inflight_requests = 1  # e1 busy; e0 and e2 look idle
    state.dispatched("bad", "e0", 100, NOW)
    if how == "error answer":
        state.finished("bad", ok=False)
    else:
        state.moved("bad", "e2")
        state.finished("bad", ok=True)
    got = s.score(cycle(state, req(tokens=160, seed=4)), cands(state))
    assert got == pytest.approx([0.4, 0.2, 0.6])  # e0 scored as busy: only e2 leads


@pytest.mark.parametrize("recovery", ["a first token", "a request answered"])
def test_a_failing_endpoint_takes_the_idle_lead_again_once_it_serves(recovery: str) -> None:
    state, s = _cold_pool_with_recency()
    state.endpoints["e1"].inflight_requests = 1
    state.dispatched("bad", "e0", 100, NOW)
    state.finished("bad", ok=False)
    state.dispatched("good", "e0", 100, NOW)
    if recovery == "a first token":
        state.first_token("good")
    state.finished("good", ok=True if recovery == "a request answered" else None)
    assert state.endpoints["e0"].failed_at is None
    got = s.score(cycle(state, req(tokens=160, seed=4)), cands(state))
    assert got == pytest.approx([1.0, 0.2, 0.6])


def test_an_end_of_unknown_outcome_leaves_failing_as_it_was() -> None:
    state = pool(met())
    state.dispatched("bad", "e0", 100, NOW)
    state.finished("bad", ok=False)
    state.dispatched("gone", "e0", 100, NOW)
    state.finished("gone")  # the client left before any answer
    assert state.endpoints["e0"].failed_at is not None


def test_no_hit_lru_leaves_warm_requests_to_the_other_scorers_when_endpoints_are_idle() -> None:
    state, s = _cold_pool_with_recency()
    state.endpoints["e0"].inflight_requests = 1
    warm = req(tokens=160, seed=4)
    state.remember("e0", cycle(state, warm).chain.all())
    assert s.score(cycle(state, warm), cands(state)) is None


def test_no_hit_lru_a_partial_holder_with_room_leads_even_when_busy() -> None:
    from shared.core.routing.domain import RouteRequest

    state, s = _cold_pool_with_recency()
    family = [7] * 16

    def chat(group: int) -> RouteRequest:
        return RouteRequest(f"g{group}", "m", token_ids=family + [group * 1000 + i for i in range(144)])

    state.remember("e1", cycle(state, chat(1)).chain.all())
    state.endpoints["e1"].inflight_requests = 3
    assert list(s.score(cycle(state, chat(2)), cands(state))) == [0.5, 1.0, 0.0]


def test_no_hit_lru_a_partial_holder_half_full_of_other_prefixes_gives_way_to_an_idle_endpoint() -> None:
    from shared.core.routing.domain import RouteRequest
    from shared.core.routing.scorers.no_hit_lru import NoHitLruScorer

    state = pool(met(), met(), met())
    for i in range(3):
        state.upsert(Endpoint(id=f"e{i}", model="m", num_gpu_blocks=100))
    family = [7] * 16

    def chat(group: int) -> RouteRequest:
        return RouteRequest(f"g{group}", "m", token_ids=family + [group * 1000 + i for i in range(144)])

    state.remember("e1", cycle(state, chat(1)).chain.all())
    state.precise.add(state.endpoints["e1"].slot, list(range(10**6, 10**6 + 50)))  # half its blocks cached
    state.endpoints["e1"].inflight_requests = 1
    state.endpoints["e0"].inflight_requests = 1
    s = NoHitLruScorer("n", NoHitParams(source="approximate", cold_below=0.3))
    for eid in ("e0", "e1", "e2"):
        s.picked(cycle(state), state.endpoints[eid])
    assert s.score(cycle(state, chat(2)), cands(state)) == pytest.approx([0.4, 0.2, 0.6])  # e2 idle: it leads


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_no_hit_lru_idle_first_is_a_fraction(bad: float) -> None:
    from shared.core.routing.scorers.no_hit_lru import NoHitLruScorer

    assert NoHitLruScorer.check(NoHitParams(idle_first=bad))


def test_a_failure_keeps_the_idle_lead_off_its_endpoint_for_the_hold_only() -> None:
    from shared.core.routing.domain import FAILED_HOLD_S

    state, s = _cold_pool_with_recency()
    state.endpoints["e1"].inflight_requests = 1
    state.dispatched("bad", "e0", 100, NOW)
    state.finished("bad", ok=False)
    during = s.score(cycle(state, req(tokens=160, seed=4), now=NOW + FAILED_HOLD_S - 1), cands(state))
    after = s.score(cycle(state, req(tokens=160, seed=4), now=NOW + FAILED_HOLD_S), cands(state))
    assert during == pytest.approx([0.4, 0.2, 0.6]) and after == pytest.approx([1.0, 0.2, 0.6])
