"""Which reporting engines a picker may route to: the admission rule of its pool.

An engine server joins a picker's pool by reporting (``EngineMetrics``: its instance id, model, address). Two
sources of truth decide whether a reporting engine is *routable*:

- ``PoolSource.ENGINES``: every engine that reports (the standalone gateway demo and the benches, where no
  placement runs and the engines are started by hand);
- ``PoolSource.PLACEMENT``: an engine is routable only while placement holds its instance RUNNING, for the same
  model. A DRAINING instance leaves the pool at once (no new request; the ones in flight finish and stay
  booked), a deleted one too, and an engine whose instance id placement does not know is never admitted:
  engines share one bus identity, so an id placement never issued is a stray or a forged server, not capacity.

Pure: the instances' states come in, a yes/no goes out.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import NamedTuple

from shared.core.placement.domain import InstanceState


class PoolSource(StrEnum):
    """Where a picker's pool comes from."""

    ENGINES = "engines"  # every engine that reports
    PLACEMENT = "placement"  # engines whose instance placement holds RUNNING


class Placed(NamedTuple):
    """Placement's view of one instance."""

    model: str
    state: InstanceState


def refusal(source: PoolSource, instance_id: str, model: str, placed: Mapping[str, Placed]) -> str | None:
    """Why the engine reporting as ``instance_id`` serving ``model`` is not routable now, or None when it is."""
    if source is PoolSource.ENGINES:
        return None
    inst = placed.get(instance_id)
    if inst is None:
        return "placement knows no such instance"
    if inst.model != model:
        return f"placement's instance serves {inst.model!r}, the engine reports {model!r}"
    if inst.state is not InstanceState.RUNNING:
        return f"instance is {inst.state.value}"
    return None


def routable(source: PoolSource, instance_id: str, model: str, placed: Mapping[str, Placed]) -> bool:
    """Whether the engine reporting as ``instance_id`` for ``model`` may receive new requests."""
    return refusal(source, instance_id, model, placed) is None
