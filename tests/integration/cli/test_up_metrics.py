"""`gantry up` gives every placement service a /metrics port of its own (recorded in stack.json); after the
demo's placements each shows the placement SLI histogram with observations at its stage."""

from __future__ import annotations

import json
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.host.metrics import SLI, STAGES

from .conftest import Stack

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


def test_every_service_of_the_stack_shows_the_sli_histogram(stack: Stack) -> None:
    state = json.loads((stack.home / "stack.json").read_text())
    urls: dict[str, str] = state["metrics"]
    assert set(urls) == set(STAGES)
    assert len({u for u in urls.values()}) == len(urls), "each service needs a port of its own"
    for service, stage in STAGES.items():
        # The demo placed 3 replicas (llama-8b ×2, llama-70b ×1): every stage saw each at least once.
        assert sli_count(urls[service], service, stage) >= 3, f"{service} at {stage}"
