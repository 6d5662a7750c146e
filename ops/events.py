"""Decoding and one-line rendering of the events Gantry publishes (``gantry events``)."""

from __future__ import annotations

import time

import msgspec

from shared.bus import subjects
from shared.bus.messages import (
    CordonEvent,
    DecisionEvent,
    DecisionEvents,
    ErrorEvent,
    InstanceEvent,
    InstanceEvents,
    MessageError,
    ModelEvent,
    ModelEvents,
    UnschedulableEvent,
    WorkerRemovedEvent,
    decode,
)

EventMessage = (
    DecisionEvent | UnschedulableEvent | InstanceEvent | CordonEvent | ModelEvent | ErrorEvent | WorkerRemovedEvent
)

BATCHES = (InstanceEvents, DecisionEvents, ModelEvents)  # subjects whose messages carry several events

EVENT_TYPES: dict[str, type[EventMessage | InstanceEvents | DecisionEvents | ModelEvents]] = {
    subjects.EVENT_DECISION: DecisionEvents,
    subjects.EVENT_UNSCHEDULABLE: UnschedulableEvent,
    subjects.EVENT_INSTANCE: InstanceEvents,
    subjects.EVENT_INSTANCE_PROGRESS: InstanceEvents,
    subjects.EVENT_CORDON: CordonEvent,
    subjects.EVENT_MODEL: ModelEvents,
    subjects.EVENT_WORKER_REMOVED: WorkerRemovedEvent,
}


def decode_events(subject: str, data: bytes) -> list[EventMessage]:
    """The typed events of one message on ``subject`` (decisions, instance and model changes come in batches);
    none for a subject or payload this CLI does not know."""
    kind = ErrorEvent if subject.startswith(subjects.DEAD_LETTER + ".") else EVENT_TYPES.get(subject)
    if kind is None:
        return []
    try:
        decoded = decode(data, kind)
    except MessageError:
        return []
    if isinstance(decoded, BATCHES):
        return list(decoded.events)
    return [decoded]  # type: ignore[list-item]  # kind is one of EventMessage


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(ts)) if ts else "--:--:--"


def _gpus(indexes: tuple[int, ...]) -> str:
    return ",".join(str(i) for i in indexes) or "-"


def event_model(event: EventMessage) -> str:
    """The model an event is about ('' for cordon events)."""
    if isinstance(event, InstanceEvent):
        return event.instance.model
    if isinstance(event, CordonEvent | ErrorEvent | WorkerRemovedEvent):
        return ""
    return event.model


def format_event(event: EventMessage, stored_at: float) -> str:
    """One human line per event; ``stored_at`` (when the stream stored the message: its publish time) stands in
    for events that carry no time of their own."""
    if isinstance(event, DecisionEvent):
        parts = ", ".join(f"{k} {v:g}" for k, v in sorted(event.breakdown.items()))
        return (
            f"{_clock(event.at)} placed        {event.model} {event.instance_id} -> {event.worker} "
            f"GPU {_gpus(event.gpu_indexes)}  score {event.score:g} ({parts})  "
            f"{event.latency_ms:.1f} ms, attempt {event.attempt}"
        )
    if isinstance(event, UnschedulableEvent):
        return f"{_clock(event.at)} unschedulable {event.model} {event.instance_id}: {event.message}"
    if isinstance(event, InstanceEvent):
        inst = event.instance
        at = _clock(event.at or stored_at)
        if event.removed:
            return f"{at} removed       {inst.model} {inst.id}"
        where = f" on {inst.worker} GPU {_gpus(inst.gpu_indexes)}" if inst.worker else ""
        why = f" ({inst.reason})" if inst.reason and inst.state.value in ("PENDING", "ERROR") else ""
        return f"{at} instance      {inst.model} {inst.id} {inst.state.value}{where}{why}"
    if isinstance(event, ErrorEvent):
        return f"{_clock(event.at or stored_at)} rejected      by {event.service} on {event.subject}: {event.reason}"
    if isinstance(event, WorkerRemovedEvent):
        return f"{_clock(stored_at)} worker gone   {event.worker}" + (f" ({event.reason})" if event.reason else "")
    if isinstance(event, CordonEvent):
        target = event.worker if event.gpu_index is None else f"{event.worker}:{event.gpu_index}"
        verb = "cordoned" if event.cordoned else "uncordoned"
        return f"{_clock(stored_at)} {verb:<13} {target}"
    return f"{_clock(stored_at)} model         {event.model} replicas={event.replicas}"


def event_json(subject: str, event: EventMessage, stored_at: float) -> bytes:
    """One NDJSON line: the subject, when the stream stored it (the event's publish time) and the event's fields."""
    return msgspec.json.encode({"subject": subject, "stored_at": stored_at, "event": event})
