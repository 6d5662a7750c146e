"""The pipeline's stages asked again: scoring a replica a second time (a redelivery, or its batch handed back one
message at a time after a poison one) does not count its own first guess against it; fitting answers a retry that
freed room triggered from the freed snapshot, not from a "nothing fits" it kept; a publish no stream answered is
the infrastructure's failure, not the message's. The stages in process, as tests/unit/services/test_stages.py."""

from __future__ import annotations

from typing import TypeVar

import nats.js.errors

from services.filter.service import FilterService
from services.fitting.service import FittingService
from services.scoring.service import ScoringService
from shared.bus.messages import InstanceEvent, PlacementFitted, PlacementItem, PlacementRequest
from shared.core.placement.domain import GIB, Gpu, Instance, InstanceState, ModelSpec, Worker
from shared.host.isolation import transient
from shared.host.service import PlacementService
from shared.settings import Settings

NOW = 1000.0
LLM = ModelSpec(name="llm", weight_bytes=14 * GIB)  # ~90 % of one 80 GiB GPU a replica


S = TypeVar("S", bound=PlacementService)


def stage(kind: type[S], clock: list[float] | None = None) -> S:
    now = clock or [NOW]
    svc = kind(Settings(), clock=lambda: now[0])
    w = Worker(name="w0", gpus=(Gpu(index=0, vram_total=80 * GIB),), ram_total=256 * GIB, last_heartbeat=NOW - 1)
    svc.snapshot.upsert_worker(w)
    svc.feed.inventory[w.name] = w
    return svc


def request(batch: str) -> PlacementRequest:
    return PlacementRequest(batch_id=batch, items=(PlacementItem(instance_id="llm-0", model="llm"),),
                            specs={"llm": LLM})


def fitted() -> PlacementFitted:
    flt, _ = stage(FilterService).filter_request(request("b1"))
    out, failed = stage(FittingService).fit(flt)
    assert failed is None
    return out[0]


def test_a_replica_scored_again_is_not_refused_by_its_own_first_guess() -> None:
    scoring = stage(ScoringService)
    msg = fitted()
    first = scoring.score(msg).outcomes[0]
    again = scoring.score(msg).outcomes[0]  # its only GPU held by the first pass's assumption, before
    assert first.decision is not None and again.decision is not None and not again.retry
    assert list(scoring.feed.assumed) == ["llm-0"]  # one guess stands for it, the latest


def test_a_retry_after_room_was_freed_is_fitted_on_the_freed_snapshot_not_a_kept_nothing_fits() -> None:
    clock = [NOW]
    fitting, filt = stage(FittingService, clock), stage(FilterService, clock)
    holder = Instance(id="other-0", model="other", state=InstanceState.RUNNING, worker="w0", gpu_indexes=(0,),
                      vram_claims=(75 * GIB,))
    fitting.feed.on_instance(InstanceEvent(instance=holder, at=NOW))
    flt, _ = filt.filter_request(request("b1"))
    assert fitting.fit(flt)[0] == []  # nothing fits: the GPU is held
    fitting.feed.on_instance(InstanceEvent(instance=holder, removed=True, at=NOW + 0.05))  # "resources freed"
    clock[0] += 0.1  # well within the fit cache's time
    flt, _ = filt.filter_request(request("b2"))
    out, failed = fitting.fit(flt)
    assert out and failed is None


def test_a_publish_no_stream_answered_is_redelivered_not_dead_lettered() -> None:
    # right after a NATS restart, JetStream restoring its streams: the valid input was terminated
    assert transient(nats.js.errors.NoStreamResponseError())
