"""Flow control: strict bands, tenant round robin, FCFS/EDF, bounds and TTL answers."""

from __future__ import annotations

from shared.core.routing import EXPIRED, QUEUE_FULL, Decision, Refusal
from shared.core.routing.flow_control import FlowConfig, FlowController
from tests.unit.routing.helpers import NOW, met, pool, req, router


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


def test_router_never_queues_sheddable_traffic() -> None:
    r = router(FLOW, pool(met(waiting=10)))
    out = r.submit(req("s", priority=-1), NOW)
    assert isinstance(out, Refusal) and out.code == 429
