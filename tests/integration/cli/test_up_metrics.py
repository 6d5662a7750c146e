"""`gantry up` gives every placement service a /metrics port of its own (recorded in stack.json); after a scale
each shows the placement SLI histogram with new observations at its stage."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ops.stack import PICKER_CHILD
from shared.host.metrics import SLI, STAGES

from .conftest import Result, Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def sli_count(url: str, service: str, stage: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == f"{SLI}_count" and s.labels == {"service": service, "stage": stage}
    )


def test_every_service_of_the_stack_shows_the_sli_histogram(stack: Stack, gantry: Callable[..., Result]) -> None:
    state = json.loads((stack.home / "stack.json").read_text())
    urls: dict[str, str] = state["metrics"]
    assert set(urls) == {*STAGES, PICKER_CHILD}  # `gantry up` runs the gateway: its picker has a port too
    assert len(set(urls.values())) == len(urls), "each service needs a port of its own"
    # Counted from now: another test of the package may have restarted a service (its counters with it).
    before = {service: sli_count(urls[service], service, stage) for service, stage in STAGES.items()}
    up = gantry("scale", "llama-8b", "3", "--wait", "--timeout", "60")
    assert up.code == 0, up.err
    try:
        for service, stage in STAGES.items():
            assert sli_count(urls[service], service, stage) >= before[service] + 1, f"{service} at {stage}"
    finally:
        down = gantry("scale", "llama-8b", "2", "--wait", "--timeout", "60")  # the demo's count, for other tests
        assert down.code == 0, down.err


def test_the_stacks_gateway_shows_its_refused_engine_reports(stack: Stack) -> None:
    state = json.loads((stack.home / "stack.json").read_text())
    with urllib.request.urlopen(state["metrics"][PICKER_CHILD], timeout=10) as resp:
        text = resp.read().decode()
    reasons = {s.labels["reason"] for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "gantry_engine_reports_rejected_total" and s.labels["service"] == "gateway"}
    assert reasons == {"unsigned", "forged", "replayed", "ahead"}  # the stack signs: its gateway checks reports
