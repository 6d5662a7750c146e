"""The admission rule of a picker's pool: with the pool from placement, only engines whose instance placement
holds RUNNING for the same model take new requests."""

from __future__ import annotations

import pytest

from shared.core.placement.domain import InstanceState
from shared.core.routing.pool_source import Placed, PoolSource, refusal, routable

S = InstanceState
PLACED = {
    "m-running": Placed("m", S.RUNNING),
    "m-draining": Placed("m", S.DRAINING),
    "m-starting": Placed("m", S.STARTING),
    "m-scheduled": Placed("m", S.SCHEDULED),
    "m-pending": Placed("m", S.PENDING),
    "m-error": Placed("m", S.ERROR),
    "m-unreachable": Placed("m", S.UNREACHABLE),
}


@pytest.mark.parametrize(("instance", "model", "admitted", "why"), [
    ("m-running", "m", True, None),
    ("m-draining", "m", False, "instance is DRAINING"),  # scale-down: no new request, in-flight ones finish
    ("m-starting", "m", False, "instance is STARTING"),  # its server may answer before placement calls it up
    ("m-scheduled", "m", False, "instance is SCHEDULED"),
    ("m-pending", "m", False, "instance is PENDING"),
    ("m-error", "m", False, "instance is ERROR"),
    ("m-unreachable", "m", False, "instance is UNREACHABLE"),
    ("gone", "m", False, "placement knows no such instance"),  # deleted, or never issued (a stray server)
    ("m-running", "other", False, "placement's instance serves 'm', the engine reports 'other'"),
])
def test_placement_admits_only_running_instances_of_the_reported_model(
        instance: str, model: str, admitted: bool, why: str | None) -> None:
    assert routable(PoolSource.PLACEMENT, instance, model, PLACED) is admitted
    assert refusal(PoolSource.PLACEMENT, instance, model, PLACED) == why


@pytest.mark.parametrize("instance", [*PLACED, "gone"])
def test_the_engines_source_admits_every_engine_that_reports(instance: str) -> None:
    assert routable(PoolSource.ENGINES, instance, "m", PLACED)
    assert routable(PoolSource.ENGINES, instance, "m", {})
