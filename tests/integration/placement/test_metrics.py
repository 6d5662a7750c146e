"""Every placement service serves Prometheus metrics: after a scale, each shows the placement SLI histogram
with observations at its stage (the reconciler's: committed), the messages it handled, and the reconciler's
PENDING gauge and dead-letter counter move with what happened."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.bus import subjects
from shared.core.placement.domain import GIB, InstanceState, ModelSpec
from shared.host.metrics import HANDLED, PENDING, SLI, STAGES

from .conftest import Stack, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MODEL = ModelSpec(name="metered", source="x/metered", weight_bytes=8 * GIB)
HUGE = ModelSpec(name="too-big", source="x/too-big", vram_claim=500 * GIB)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``GET /metrics`` parsed: (sample name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


async def test_each_service_shows_the_sli_histogram_after_a_scale(stack: Stack) -> None:
    stack.start_workers("fleet", "--count", "2", "--gpus", "2", "--heartbeat-interval", "0.2")
    stack.start_services()
    await stack.wait_ready(workers=2)
    await stack.scale(MODEL, 3)

    async def running() -> bool:
        insts = await stack.instances(MODEL.name)
        return len(insts) == 3 and all(i.state is InstanceState.RUNNING for i in insts)

    await wait_until(running, 30, "3 RUNNING replicas")
    for service, stage in STAGES.items():
        samples = scrape(stack.metrics_ports[f"{service}-0"])
        count = value(samples, f"{SLI}_count", service=service, stage=stage)
        assert count >= 3, f"{service}: {count} SLI observations at stage {stage}"
        inf = value(samples, f"{SLI}_bucket", service=service, stage=stage, le="+Inf")
        assert inf == count
        assert 0 < value(samples, f"{SLI}_sum", service=service, stage=stage) < 30 * count
        assert value(samples, HANDLED, service=service) >= 1, f"{service} counted no message"
    for service in STAGES:  # logs are files here, not a terminal: plain text, no colour codes
        log = (stack.logs / f"{service}-0.log").read_text()
        assert "FastStream app started" in log and "\x1b[" not in log, log[:500]
    committed = scrape(stack.metrics_ports["reconciler-0"])
    assert value(committed, "gantry_placements_committed_total", service="reconciler") == 3
    assert value(committed, HANDLED, service="reconciler", subject=subjects.PLACEMENT_SCORED) >= 1


async def test_reconciler_gauges_pending_replicas_and_counts_dead_letters(stack: Stack) -> None:
    stack.start_workers("fleet", "--count", "1", "--gpus", "1", "--heartbeat-interval", "0.2")
    stack.start_services()
    await stack.wait_ready(workers=1)
    await stack.scale(HUGE, 2)
    await stack.nc.jetstream().publish(subjects.SCALE, b"{not json", headers={"Nats-Msg-Id": "metrics-bad-1"})
    port = stack.metrics_ports["reconciler-0"]

    async def seen() -> bool:
        samples = await asyncio.to_thread(scrape, port)
        return (
            value(samples, PENDING, service="reconciler") == 2
            and value(samples, "gantry_dead_letters_total", service="reconciler", subject=subjects.SCALE) == 1
        )

    await wait_until(seen, 20, "2 pending replicas and 1 dead letter in the reconciler's metrics")
    assert stack.crashed() == []
