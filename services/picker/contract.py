"""What the NATS picker reads and writes on the bus."""

from __future__ import annotations

from shared.bus import subjects
from shared.bus.messages import EndpointOutcomes, ErrorEvent, PickProgress, PickRequest
from shared.host.contract import Consumes, Contract, Emits
from shared.host.engine_feed import FEED_CONSUMES, SNAPSHOT_EMITS

SERVICE = "picker"

CONTRACT = Contract(
    service=SERVICE,
    description="Gantry's endpoint picker on NATS: answers pick requests (request/reply, replicas in one queue "
                "group) with the routing core, its pool, load and prefix cache kept from the model servers' own "
                "reports; the reply goes to the requester's inbox.",
    consumes=(
        Consumes(subjects.PICK, PickRequest, "requests to place (one or more per message); the reply, a PickReply "
                 "in the same order, goes to the request's inbox", queue=subjects.PICK_QUEUE),
        Consumes(subjects.PICK_PROGRESS, PickProgress, "first tokens and ends of placed requests: in-flight "
                 "accounting (every replica)"),
        *FEED_CONSUMES,
        Consumes(subjects.PICKER_OUTCOMES, EndpointOutcomes, "the other picker replicas' engine failures, counted "
                 "as this replica's own (its own messages and duplicates dropped)"),
    ),
    emits=(
        SNAPSHOT_EMITS,
        Emits(subjects.PICKER_OUTCOMES, EndpointOutcomes, "each engine failure of a request it placed, and the "
              "first success after failures, every 50 ms when there are any, and each second the engines it counts "
              "as failing: every replica leaves a broken engine out after three failures in all"),
        Emits(subjects.dead_letter(SERVICE), ErrorEvent, "a pick request or engine report it rejected, and why"),
    ),
)
