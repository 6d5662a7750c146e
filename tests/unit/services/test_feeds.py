"""Which cluster events each service's snapshot follows: every subscription fans out to all replicas."""

from __future__ import annotations

import pytest

from services.filter.service import FilterService
from services.fitting.service import FittingService
from services.reconciler.service import Reconciler
from services.scoring.service import ScoringService
from shared.bus import subjects
from shared.host.service import PlacementService
from shared.settings import Settings

WORKERS = {subjects.EVENT_WORKER_REGISTERED, subjects.HEARTBEAT, subjects.EVENT_CORDON, subjects.EVENT_WORKER_REMOVED}


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        (FilterService, set()),
        (FittingService, {subjects.EVENT_INSTANCE}),
        (ScoringService, {subjects.EVENT_INSTANCE, subjects.MODEL_FILE}),
        (Reconciler, {subjects.EVENT_INSTANCE}),
    ],
)
def test_each_service_follows_only_the_cluster_events_its_decisions_read(
    kind: type[PlacementService], extra: set[str]
) -> None:
    svc = kind(Settings())
    fan_out = {subject for subject, queue, _ in [*svc._listens, *svc._reports] if not queue}
    assert fan_out == WORKERS | extra
    assert subjects.REGISTER not in fan_out  # raw registrations reach only the state writer (queue group)
