"""Flow control: strict bands, tenant round robin, FCFS/EDF, bounds and TTL answers."""

from __future__ import annotations

from shared.core.routing import EXPIRED, QUEUE_FULL, Decision, Refusal
from shared.core.routing.flow_control import FlowConfig, FlowController
from tests.unit.routing.helpers import NOW, PD, met, pool, req, router


def drain(fc: FlowController) -> list[str]:
    out = []
    while (r := fc.pop()) is not None:
        out.append(r.request_id)
    return out


def test_higher_priority_band_always_goes_first() -> None:
    fc = FlowController()
    fc.enqueue(req("low", priority=0), 0)
    fc.enqueue(req("high", priority=5), 1)
    assert drain(fc) == ["high", "low"]


def test_tenants_take_turns_within_a_band() -> None:
    fc = FlowController()
    for i in range(3):
        fc.enqueue(req(f"a{i}", tenant="a"), i)
    fc.enqueue(req("b0", tenant="b"), 10)
    fc.enqueue(req("c0", tenant="c"), 11)
    assert drain(fc) == ["a0", "b0", "c0", "a1", "a2"]


def test_global_strict_ignores_tenants() -> None:
    fc = FlowController(FlowConfig(fairness="global-strict"))
    for i in range(3):
        fc.enqueue(req(f"a{i}", tenant="a"), i)
    fc.enqueue(req("b0", tenant="b"), 10)
    assert drain(fc) == ["a0", "a1", "a2", "b0"]


def test_edf_orders_by_deadline_within_a_tenant() -> None:
    fc = FlowController(FlowConfig(ordering="edf"))
    fc.enqueue(req("late", slo_ttft_s=10.0), 0)
    fc.enqueue(req("soon", slo_ttft_s=1.0), 1)
    fc.enqueue(req("none"), 2)  # deadline = TTL
    assert drain(fc) == ["soon", "late", "none"]


def test_bounds_refuse_with_429_instead_of_dropping() -> None:
    fc = FlowController(FlowConfig(max_queued=2, max_queued_per_band=1))
    assert fc.enqueue(req("a"), 0) is None
    band = fc.enqueue(req("b"), 0)
    assert isinstance(band, Refusal) and band.code == QUEUE_FULL and "band 0" in band.reason
    assert fc.enqueue(req("c", priority=1), 0) is None
    full = fc.enqueue(req("d", priority=2), 0)
    assert isinstance(full, Refusal) and "queue full" in full.reason
    assert len(fc) == 2


def test_expired_requests_are_answered_never_dropped() -> None:
    fc = FlowController(FlowConfig(ttl_s=10))
    fc.enqueue(req("old"), 0)
    fc.enqueue(req("new"), 5)
    assert fc.expire(9.9) == []
    gone = fc.expire(10.0)
    assert [(r.request_id, r.code) for r in gone] == [("old", EXPIRED)] and "TTL" in gone[0].reason
    assert drain(fc) == ["new"]


def test_duplicate_ids_queue_once_and_cancel_removes() -> None:
    fc = FlowController()
    fc.enqueue(req("a"), 0)
    fc.enqueue(req("a"), 1)
    assert len(fc) == 1 and fc.cancel("a") and not fc.cancel("a") and len(fc) == 0


def test_requests_leaving_out_of_order_are_reclaimed_while_nothing_is_dispatched() -> None:
    for ordering in ("fcfs", "edf"):
        fc = FlowController(FlowConfig(ttl_s=1.0, max_queued=100, ordering=ordering))
        for step in range(20_000):  # a saturated pool: nothing pops; clients leave, the TTL answers the rest
            now = step * 0.01
            fc.enqueue(req(f"r{step}", tenant=f"t{step % 7}", priority=step % 3), now)
            if step % 3 == 0:
                fc.cancel(f"r{step}")
            fc.expire(now)
            # a queue holds at most as many dead entries as live ones; the expiry heap up to 64 more
            assert fc.held() <= 4 * len(fc) + 2 * 64, (ordering, step, fc.held(), len(fc))


def test_many_fairness_ids_cannot_each_keep_cancelled_requests_alive() -> None:
    fc = FlowController(FlowConfig())
    for t in range(2_000):  # a client's header names the fairness id: each one keeps one request, cancels the rest
        for i in range(64):
            fc.enqueue(req(f"t{t}-{i}", tenant=f"tenant{t}"), 0)
        for i in range(1, 64):
            fc.cancel(f"t{t}-{i}")
    assert len(fc) == 2_000 and fc.held() <= 4 * len(fc) + 2 * 64  # it held 131,092 entries (every prompt)


def test_dispatched_requests_leave_the_expiry_heap_long_before_their_ttl() -> None:
    fc = FlowController(FlowConfig(ttl_s=900))
    for i in range(10_000):
        fc.enqueue(req(f"r{i}"), 0)
        assert fc.pop() is not None
    assert len(fc) == 0 and fc.held() <= 2 * 64


def test_a_fairness_id_at_its_bound_is_refused_while_others_still_queue() -> None:
    fc = FlowController(FlowConfig(max_queued_per_band=10, max_queued_per_tenant=4))
    assert [fc.enqueue(req(f"f{i}", tenant="flood"), 0) for i in range(4)] == [None] * 4
    refused = fc.enqueue(req("f4", tenant="flood"), 0)
    assert isinstance(refused, Refusal) and refused.code == QUEUE_FULL and "fairness id" in refused.reason
    assert fc.enqueue(req("v", tenant="victim"), 0) is None


FLOW = """
plugins: [{type: queue-scorer}]
flow_control: {enabled: true, max_inflight_per_endpoint: 1}
"""


def test_router_queues_without_headroom_and_dispatches_when_it_returns() -> None:
    r = router(FLOW, pool(met()))
    assert isinstance(r.submit(req("a"), NOW), Decision)
    assert r.submit(req("b"), NOW) is None and r.queued() == 1
    assert r.dispatch(NOW) == []
    r.finished("a")
    out = r.dispatch(NOW)
    assert [o.request_id for o in out] == ["b"] and isinstance(out[0], Decision)


def test_requests_flow_control_lets_go_land_only_on_endpoints_with_room() -> None:
    # e0 has the shortest queue (the queue scorer's favourite) but its KV cache is past the threshold; e1 has room:
    # the gate opens for e1, so e1 is where the requests go, up to its cap, and the rest wait for it
    r = router(FLOW.replace("max_inflight_per_endpoint: 1", "max_inflight_per_endpoint: 2"),
               pool(met(waiting=0, kv=0.95), met(waiting=4, kv=0.1)))
    outs = [r.submit(req(f"r{i}"), NOW) for i in range(5)]
    assert [o.endpoint for o in outs if isinstance(o, Decision)] == ["e1", "e1"] and r.queued() == 3
    assert r.dispatch(NOW) == []
    r.finished("r0")
    out = r.dispatch(NOW)
    assert [(o.request_id, o.endpoint) for o in out if isinstance(o, Decision)] == [("r2", "e1")]
    assert r.state.endpoints["e0"].inflight_requests == 0


def test_router_never_queues_sheddable_traffic() -> None:
    r = router(FLOW, pool(met(waiting=10)))
    out = r.submit(req("s", priority=-1), NOW)
    assert isinstance(out, Refusal) and out.code == 429


PD_FLOW = PD + "flow_control: {enabled: true, max_inflight_per_endpoint: 4}\n"


def test_pd_requests_flow_control_lets_go_are_routed_when_the_room_is_on_the_prefill_side() -> None:
    from shared.core.roles import NodeRole

    state = pool(met(waiting=6), met(waiting=6), roles=(NodeRole.PREFILL, NodeRole.DECODE))
    r = router(PD_FLOW, state)
    assert r.submit(req("c", tokens=320, seed=3), NOW) is None  # queued: nothing has room
    state.update_metrics("e0", met(waiting=0))  # the prefill endpoint drains first; decode is still busy
    out = r.dispatch(NOW)  # narrowed to the prefill endpoint, the decode profile refused every request (503)
    assert [(o.endpoint, o.prefill) for o in out if isinstance(o, Decision)] == [("e1", "e0")]


def test_a_request_no_endpoint_with_room_can_take_waits_for_room_it_can_use() -> None:
    from shared.core.roles import NodeRole

    yaml = """
plugins:
  - {type: role-filter, name: decode-role, parameters: {phase: decode}}
  - {type: queue-scorer}
profiles:
  - {name: decode, plugins: [{ref: decode-role}, {ref: queue-scorer}]}
flow_control: {enabled: true, max_inflight_per_endpoint: 4}
"""
    state = pool(met(waiting=0), met(waiting=6), roles=(NodeRole.PREFILL, NodeRole.DECODE))
    r = router(yaml, state)
    # the room is the prefill endpoint's, which this profile never takes: before, the request went to the busy
    # decode endpoint (50 of them piled past its cap of 4), and the idle one kept the gate open for good
    assert [r.submit(req(f"r{i}"), NOW) for i in range(50)] == [None] * 50 and r.queued() == 50
    assert r.dispatch(NOW) == [] and r.queued() == 50 and state.endpoints["e1"].inflight_requests == 0
    state.update_metrics("e1", met(waiting=0))  # the decode endpoint has room again: up to its cap
    out = r.dispatch(NOW)
    assert [o.endpoint for o in out if isinstance(o, Decision)] == ["e1"] * 4 and r.queued() == 46
    assert [o.request_id for o in out] == ["r0", "r1", "r2", "r3"]  # in their order: none lost its place


def test_a_request_put_back_keeps_its_place_and_its_expiry() -> None:
    for ordering in ("fcfs", "edf"):
        fc = FlowController(FlowConfig(ttl_s=10, ordering=ordering))
        fc.enqueue(req("a"), 0)
        fc.enqueue(req("b"), 1)
        popped = fc.pop()
        assert popped is not None and popped.request_id == "a"
        fc.putback()  # no endpoint with room could take it
        assert len(fc) == 2 and "a" in fc
        assert [r.request_id for r in fc.expire(10.0)] == ["a"]  # still 10 s from when it arrived
        assert drain(fc) == ["b"] and fc.held() <= 2 * 64
