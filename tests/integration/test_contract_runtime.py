"""On a real nats-server: a service's bus publishes what its contract declares, and says so (once per subject)
when it publishes anything else."""

from __future__ import annotations

import logging

import nats
import pytest

from ops.servers import ServerProcess
from services.scoring.service import ScoringService
from shared.bus import subjects
from shared.bus.messages import CordonEvent, ErrorEvent
from shared.bus.runtime import Bus
from shared.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


async def test_a_publish_outside_the_contract_is_logged_once_and_declared_ones_are_not(
    nats_server: ServerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    contract = ScoringService(Settings()).contract()
    nc = await nats.connect(nats_server.url)
    try:
        bus = Bus(nc, "scoring", declared=contract.emit_check())
        with caplog.at_level(logging.ERROR, logger="gantry.bus"):
            await bus.publish(subjects.dead_letter("scoring"), ErrorEvent(service="scoring", subject="x", reason="y"))
            await bus.publish(subjects.EVENT_CORDON, CordonEvent(worker="w1", cordoned=True))  # the reconciler's
            await bus.publish(subjects.EVENT_CORDON, CordonEvent(worker="w1", cordoned=False))
            await nc.flush()
    finally:
        await nc.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"scoring publishes on {subjects.EVENT_CORDON}, which its contract does not declare"]
