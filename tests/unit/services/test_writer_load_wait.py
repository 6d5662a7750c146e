"""The state writer holds a heartbeat or file report heard before the snapshot is loaded until the load ends
(``svc.ready``), but not for ever: a load that never ends (Redis accepting the connection but not answering) would
hold every later report of that subject behind it (a subscription's callbacks run one at a time), and this replica
(one of a queue group) would silently swallow its share of the fleet's reports. Past ``READY_WAIT_S`` reports are
judged against what is loaded. The reconciler's real state writer (its handlers handed the messages as their
subscriptions would) on the session's real NATS and Redis; the load is never run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest

from ops.servers import ServerProcess
from services.reconciler import writer
from services.reconciler.service import Reconciler
from shared.bus import subjects
from shared.bus.messages import ModelFileUpdate, encode
from shared.bus.runtime import Bus
from shared.core.placement.domain import ModelFileState
from shared.settings import Settings
from tests.unit.services.dead_letters import dead_letters

BOUND_S = 10.0  # far past any load of a healthy Redis; a report must be judged (kept or refused) within it


@pytest.fixture
async def rec(redis_server: ServerProcess, nats_server: ServerProcess) -> AsyncIterator[Reconciler]:
    r = Reconciler(Settings(nats_url=nats_server.url, redis_url=redis_server.url.rsplit("/", 1)[0] + "/13"))
    await r.store.r.flushdb()
    nc = await nats.connect(nats_server.url)
    r._bus = Bus(nc, r.name)
    yield r
    await nc.close()
    await r.store.close()


@pytest.mark.timeout(60)
async def test_a_report_heard_while_the_load_never_ends_is_judged_within_a_bound(
        rec: Reconciler, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer, "READY_WAIT_S", 0.5)  # the same wait, shorter than the default 5 s: the bound holds
    letters = await dead_letters(rec.bus.nc)
    on_file = {s: h for s, q, h in rec._reports if q}[subjects.MODEL_FILE]
    update = encode(ModelFileUpdate(worker="w0", source="org/m", state=ModelFileState.READY))
    handled = asyncio.ensure_future(on_file(update, subjects.worker_files("w0")))
    done, _ = await asyncio.wait({handled}, timeout=BOUND_S)
    handled.cancel()
    assert done, f"the report handler still waits after {BOUND_S} s (its subscription's later reports behind it)"
    await rec.bus.nc.flush()
    await asyncio.sleep(0.1)
    assert letters or rec.writer.files
