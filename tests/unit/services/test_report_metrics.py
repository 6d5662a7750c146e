"""A picker's Prometheus metrics count the engine reports and KV messages it refused, per kind and reason."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ops.servers import free_port
from services.picker.service import PickerOptions, PickerService
from shared.bus.messages import EngineMetrics, encode
from shared.host.metrics import MetricsServer
from shared.host.report_auth import KV, METRICS, SIGNATURE_HEADER, ReportSigner, ReportVerifier, derive_key
from shared.host.report_metrics import registry_for

MASTER = bytes(range(32))
NOW = 1_000.0


def report() -> bytes:
    return encode(EngineMetrics(instance_id="e1", model="m", url="http://127.0.0.1:8001", ts=NOW,
                                num_requests_running=0, num_requests_waiting=0, kv_cache_usage_perc=0.1,
                                block_size=16, num_gpu_blocks=1000))


def rejected(text: str) -> dict[tuple[str, str, str], float]:
    """(service, kind, reason) -> count of ``gantry_engine_reports_rejected_total`` in Prometheus text."""
    return {(s.labels["service"], s.labels["kind"], s.labels["reason"]): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "gantry_engine_reports_rejected_total"}


def refuse_some(verifier: ReportVerifier) -> None:
    """Two unsigned load reports, one forged KV message, one replayed load report."""
    data, signer = report(), ReportSigner(derive_key(MASTER, "e1"), int(NOW * 1e9))
    for _ in range(2):
        verifier.admit("e1", data, None, "gantry.engine.metrics.e1", METRICS)
    verifier.admit("e1", data, {SIGNATURE_HEADER: "1.0." + "0" * 64}, "gantry.engine.kv.e1", KV)
    genuine = signer.headers(METRICS, data)
    verifier.admit("e1", data, genuine, "gantry.engine.metrics.e1", METRICS)
    verifier.admit("e1", data, genuine, "gantry.engine.metrics.e1", METRICS)


def test_refused_reports_are_counted_per_kind_and_reason() -> None:
    verifier = ReportVerifier(MASTER, wall=lambda: NOW)
    refuse_some(verifier)
    counts = rejected(generate_latest(registry_for("gateway", verifier)).decode())
    assert counts[("gateway", "metrics", "unsigned")] == 2
    assert counts[("gateway", "kv", "forged")] == 1
    assert counts[("gateway", "metrics", "replayed")] == 1
    assert counts[("gateway", "kv", "replayed")] == 0  # every kind and reason is exposed, zeros included
    assert sum(counts.values()) == 4


def test_a_picker_that_checks_no_reports_exposes_no_refusals() -> None:
    assert rejected(generate_latest(registry_for("gateway", None)).decode()) == {}


def test_the_counts_are_served_on_the_metrics_port() -> None:
    verifier = ReportVerifier(MASTER, wall=lambda: NOW)
    refuse_some(verifier)
    port = free_port()
    server = MetricsServer(registry_for("picker", verifier), port, "picker", addr="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    finally:
        server.close()
    assert rejected(text)[("picker", "metrics", "unsigned")] == 2


def test_the_nats_picker_exposes_its_verifiers_refusals() -> None:
    picker = PickerService(PickerOptions(nats_url="nats://h:4222", report_master=MASTER))
    assert picker.feed.verifier is not None
    picker.feed.verifier.admit("e1", report(), None, "gantry.engine.metrics.e1", METRICS)
    assert rejected(generate_latest(picker.metrics).decode())[("picker", "metrics", "unsigned")] == 1


def test_the_nats_picker_takes_its_metrics_port_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.picker.__main__ import parse_args

    monkeypatch.setenv("GANTRY_METRICS_PORT", "9464")
    assert parse_args(["--nats-url", "nats://h:4222"]).metrics_port == 9464
    monkeypatch.setenv("GANTRY_METRICS_PORT", "nine")
    with pytest.raises(SystemExit):
        parse_args(["--nats-url", "nats://h:4222"])


def test_the_gateway_takes_its_metrics_port_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.gateway.__main__ import parse_args

    monkeypatch.setenv("GANTRY_METRICS_PORT", "9465")
    assert parse_args(["--nats-url", "nats://h:4222", "--eds-path", "eds.json"]).metrics_port == 9465
