"""The Grafana dashboard in ops/grafana/ loads, and every panel queries metrics the services declare."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from shared.core.routing.state import PoolState
from shared.host.metrics import ServiceMetrics, declared_names
from shared.host.outcomes import OutcomeShare
from shared.host.report_auth import ReportVerifier
from shared.host.report_metrics import registry_for

DASHBOARDS = sorted((Path(__file__).resolve().parents[3] / "ops" / "grafana").glob("*.json"))
METRIC = re.compile(r"\b(gantry_[a-z0-9_]+)")


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def picker_families() -> set[str]:
    """The metric families a picker that checks engine reports serves (its refusals, its failure sharing)."""
    return {m.name for m in _picker_registry().collect()}


def picker_names() -> set[str]:
    """Every sample name of those families (counters: ``_total``)."""
    return {s.name for m in _picker_registry().collect() for s in m.samples}


def _picker_registry() -> CollectorRegistry:
    return registry_for("gateway", ReportVerifier(b"k" * 32), OutcomeShare(PoolState(), "gantry.gateway.outcomes"))


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", ())]


def test_there_is_a_dashboard() -> None:
    assert DASHBOARDS, "no dashboard JSON in ops/grafana/"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_a_grafana_dashboard(path: Path) -> None:
    dash = load(path)
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dash["panels"]:
        assert panel["title"] and panel["type"] in {"timeseries", "stat", "gauge", "table", "heatmap", "bargauge"}
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        assert panel["targets"], f"panel {panel['title']!r} queries nothing"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_expression_names_only_declared_metrics(path: Path) -> None:
    declared = declared_names() | picker_names()
    for expr in exprs(load(path)):
        named = set(METRIC.findall(expr))
        assert named, f"no Gantry metric in {expr!r}"
        assert named <= declared, f"undeclared metric(s) {named - declared} in {expr!r}"


def test_every_declared_metric_has_a_panel() -> None:
    shown = {name for path in DASHBOARDS for expr in exprs(load(path)) for name in METRIC.findall(expr)}
    families = {m.name for m in ServiceMetrics("any").registry.collect()} | picker_families()
    for family in families:
        assert any(name.startswith(family) for name in shown), f"{family} is on no dashboard panel"


def test_the_refused_engine_reports_have_a_panel_by_service_kind_and_reason() -> None:
    assert "gantry_engine_reports_rejected_total" in picker_names()
    panels = [e for path in DASHBOARDS for e in exprs(load(path)) if "gantry_engine_reports_rejected_total" in e]
    assert panels and all("by (service, kind, reason)" in e for e in panels)


def test_an_unknown_metric_is_caught() -> None:
    # The check above must be able to fail: a typo'd name is not among the declared ones.
    assert "gantry_placement_sli_duration_second_bucket" not in declared_names()
    assert "gantry_placement_sli_duration_seconds_bucket" in declared_names()
