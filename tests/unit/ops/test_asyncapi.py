"""The AsyncAPI contract is generated from the services' declarations, and the declarations tell the truth."""

from __future__ import annotations

import pytest

from ops.asyncapi import OUT, contracts, render
from services.filter.service import FilterService
from services.fitting.service import FittingService
from services.reconciler.service import Reconciler
from services.scoring.service import ScoringService
from shared.bus import streams, subjects
from shared.host.contract import subject_matches
from shared.host.service import PlacementService
from shared.settings import Settings

HOSTED = [Reconciler, FilterService, FittingService, ScoringService]


def test_the_committed_contract_is_what_the_declarations_generate() -> None:
    assert OUT.read_text() == render(), "docs/asyncapi.json is stale: run python -m ops.asyncapi"


def test_every_service_and_every_message_it_declares_is_in_the_contract() -> None:
    text = OUT.read_text()
    for contract in contracts():
        for declared in (*contract.consumes, *contract.emits):
            assert f"{contract.service}:" in text
            assert declared.subject in text
            assert declared.kind.__doc__ and declared.kind.__doc__.split("\n")[0].strip() in text


@pytest.mark.parametrize("kind", HOSTED, ids=[k.name for k in HOSTED])
def test_a_hosted_service_consumes_exactly_what_it_declares(kind: type[PlacementService]) -> None:
    svc = kind(Settings())
    contract = svc.contract()
    pulled = {(stream, durable) for stream, durable, _, _, _ in svc._pulls}
    listened = {(subject, queue) for subject, queue, _ in [*svc._listens, *svc._reports]}
    assert pulled == {(c.stream, c.durable) for c in contract.consumes if c.stream}
    assert listened == {(c.subject, c.queue) for c in contract.consumes if not c.stream}
    declared_consumers = {(stream, durable) for stream, durable, _ in svc.consumers()}
    assert declared_consumers == pulled


# sent from outside Gantry's declared parties: a pick requester (a gateway of someone else's, a bench) and its progress
EXTERNAL_SENDERS = {subjects.PICK, subjects.PICK_PROGRESS}


def test_everything_a_party_receives_some_party_declares_it_sends() -> None:
    parties = contracts()
    sent = [e.subject for c in parties for e in c.emits]
    unsent = [(c.service, d.subject) for c in parties for d in c.consumes
              if d.subject not in EXTERNAL_SENDERS
              and not any(subject_matches(d.subject, s) or subject_matches(s, d.subject) for s in sent)]
    assert unsent == []


def test_a_subscription_outside_the_contract_is_refused() -> None:
    class Sneaky(FilterService):
        def register(self) -> None:
            super().register()
            self.pull(streams.STREAM_FITTED, streams.CONSUMER_SCORING, subjects.PLACEMENT_FITTED, _nothing)

    with pytest.raises(ValueError, match="not declared"):
        Sneaky(Settings())


def test_a_listen_outside_the_contract_is_refused() -> None:
    svc = FilterService(Settings())
    with pytest.raises(ValueError, match="not declared"):
        svc.listen(subjects.MODEL_FILE, _nothing_raw)  # the filter's snapshot does not follow model files


@pytest.mark.parametrize(
    ("pattern", "subject", "matches"),
    [
        ("gantry.agent.*.assign", "gantry.agent.w1.assign", True),
        ("gantry.agent.*.assign", "gantry.agent.w1.x.assign", False),
        ("gantry.agent.*.assign", "gantry.agent.w1.delete", False),
        ("gantry.engine.metrics.>", "gantry.engine.metrics.llama-3.1-8b-0a1b", True),
        ("gantry.engine.metrics.>", "gantry.engine.metrics", False),
        ("gantry.events.model", "gantry.events.model", True),
        ("gantry.events.model", "gantry.events.model.x", False),
    ],
)
def test_subjects_match_declared_patterns_as_nats_matches_them(pattern: str, subject: str, matches: bool) -> None:
    assert subject_matches(pattern, subject) is matches


def test_the_reconciler_declares_every_per_worker_command_it_sends() -> None:
    declared = Reconciler(Settings()).contract().emit_check()
    for subject in (subjects.worker_assign("w7"), subjects.worker_drain("w7"), subjects.worker_delete("w7")):
        assert declared(subject)
    assert not declared(subjects.SCALE)


async def _nothing(raws: list[object]) -> None:
    return None


async def _nothing_raw(body: bytes) -> None:
    return None
