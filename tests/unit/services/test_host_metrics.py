"""The host's metrics: what each observation does to the exposed series, and the HTTP endpoint."""

from __future__ import annotations

import urllib.request

from prometheus_client import generate_latest

from ops.servers import free_port
from shared.bus.messages import ItemOutcome, PlacementItem, PlacementRequest, PlacementScored, ScaleCommand
from shared.host.metrics import SLI, ServiceMetrics, requested_times


def sample(metrics: ServiceMetrics, name: str, **labels: str) -> float:
    got = metrics.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


def items(*times: float) -> tuple[PlacementItem, ...]:
    return tuple(PlacementItem(instance_id=f"i{k}", model="m", requested_at=t) for k, t in enumerate(times))


def test_stage_done_observes_seconds_since_each_request_at_the_services_stage() -> None:
    m = ServiceMetrics("filter")
    m.stage_done([100.0, 99.5], now=100.25)
    assert sample(m, f"{SLI}_count", service="filter", stage="filtered") == 2
    assert sample(m, f"{SLI}_sum", service="filter", stage="filtered") == 0.25 + 0.75
    assert sample(m, f"{SLI}_bucket", service="filter", stage="filtered", le="0.32") == 1


def test_reconciler_stage_is_committed() -> None:
    m = ServiceMetrics("reconciler")
    m.stage_done([10.0], now=11.0)
    assert sample(m, f"{SLI}_count", service="reconciler", stage="committed") == 1


def test_unknown_request_time_and_clock_skew_are_not_negative_observations() -> None:
    m = ServiceMetrics("scoring")
    m.stage_done([0.0, 50.0], now=40.0)  # 0: unknown, skipped; from the future: counted as 0 s
    assert sample(m, f"{SLI}_count", service="scoring", stage="scored") == 1
    assert sample(m, f"{SLI}_sum", service="scoring", stage="scored") == 0.0


def test_batches_count_messages_per_subject_and_keep_the_latest_backlog() -> None:
    m = ServiceMetrics("fitting")
    m.batch_pulled("fitting", "gantry.placement.filtered", 5, backlog=12)
    m.batch_pulled("fitting", "gantry.placement.filtered", 1, backlog=0)
    labels = {"service": "fitting", "subject": "gantry.placement.filtered"}
    assert sample(m, "gantry_messages_handled_total", **labels) == 6
    assert sample(m, "gantry_batch_size_count", **labels) == 2
    assert sample(m, "gantry_consumer_pending_messages", service="fitting", consumer="fitting") == 0


def test_refusals_are_counted_by_verdict_kind() -> None:
    m = ServiceMetrics("reconciler")
    m.refused(["full:w0:1", "full:w1:0", "stale"])
    assert sample(m, "gantry_commit_refusals_total", service="reconciler", outcome="full") == 2
    assert sample(m, "gantry_commit_refusals_total", service="reconciler", outcome="stale") == 1


def test_requested_times_of_pipeline_messages_and_of_others() -> None:
    req = PlacementRequest(batch_id="b", items=items(1.0, 2.0), specs={})
    assert requested_times(req) == [1.0, 2.0]
    scored = PlacementScored(batch_id="b", outcomes=tuple(ItemOutcome(item=i) for i in items(3.0)))
    assert requested_times(scored) == [3.0]
    assert requested_times(ScaleCommand(model="m", replicas=1)) == []


def test_metrics_are_served_over_http_and_port_zero_serves_nothing() -> None:
    m = ServiceMetrics("filter")
    m.serve(0)
    assert m._server is None
    port = free_port()
    m.serve(port)
    try:
        m.dead_letter("gantry.cmd.scale")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert 'gantry_dead_letters_total{service="filter",subject="gantry.cmd.scale"} 1.0' in text
        assert text == generate_latest(m.registry).decode()
    finally:
        m.close()


def test_a_taken_port_does_not_stop_the_service() -> None:
    first, second = ServiceMetrics("filter"), ServiceMetrics("filter")
    port = free_port()
    first.serve(port)
    try:
        second.serve(port)  # logs an error, serves nothing, raises nothing
        assert second._server is None
    finally:
        first.close()
