"""When a picker replica may take requests (``shared.host.warmup``): its engines heard and its peers listened to for
a digest period, or at most ``WAIT_S`` after it starts whatever it heard."""

from __future__ import annotations

import asyncio

import pytest

from shared.core.routing import Endpoint, EndpointMetrics, Router, builtin_config
from shared.host import warmup


@pytest.fixture(autouse=True)
def short_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warmup, "PEERS_HEARD_S", 0.2)
    monkeypatch.setattr(warmup, "SETTLE_S", 0.05)
    monkeypatch.setattr(warmup, "WAIT_S", 0.6)


def _pool(*ids: str) -> Router:
    r = Router(builtin_config("default"), seed=0)
    r.set_endpoints([Endpoint(id=i, model="m", address=f"10.0.0.{k}:8000") for k, i in enumerate(ids)])
    return r


async def _waited(r: Router, report_after_s: float | None = None) -> float:
    """How long ``until_warm`` took, the pool's engines reporting ``report_after_s`` into it (None: never)."""
    loop = asyncio.get_running_loop()

    async def report() -> None:
        assert report_after_s is not None
        await asyncio.sleep(report_after_s)
        for eid in r.state.endpoints:
            r.update_metrics(eid, EndpointMetrics(ts=0.0))

    start = loop.time()
    task = asyncio.ensure_future(report()) if report_after_s is not None else None
    await warmup.until_warm(r.state)
    if task is not None:
        await task
    return loop.time() - start


async def test_engines_heard_at_once_still_wait_for_the_peers_digest_period() -> None:
    took = await _waited(_pool("e0", "e1"), report_after_s=0.0)
    assert warmup.PEERS_HEARD_S <= took < warmup.WAIT_S


async def test_engines_heard_late_are_waited_for_and_settled() -> None:
    took = await _waited(_pool("e0", "e1"), report_after_s=0.3)
    assert 0.3 + warmup.SETTLE_S <= took < warmup.WAIT_S


async def test_engines_never_heard_end_the_wait_at_its_bound() -> None:
    took = await _waited(_pool("e0"))  # placement lists it, it never reports
    assert took >= warmup.WAIT_S
    took = await _waited(_pool())  # no engine at all: its 503s will say why
    assert took >= warmup.WAIT_S
