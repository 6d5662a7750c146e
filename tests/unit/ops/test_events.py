"""`gantry events` renders every declared event as one line and skips what it cannot decode."""

from __future__ import annotations

import json

import pytest

from ops.events import decode_events, event_json, event_model, format_event
from shared.bus import subjects
from shared.bus.messages import (
    SCHEMA_VERSION,
    CordonEvent,
    DecisionEvent,
    DecisionEvents,
    ErrorEvent,
    InstanceEvent,
    InstanceEvents,
    ModelEvent,
    ModelEvents,
    UnschedulableEvent,
    encode,
)
from shared.core.placement.domain import Instance, InstanceState

T0 = 1_700_000_000.0  # 22:13:20 UTC

CASES = [
    (
        subjects.EVENT_DECISION,
        DecisionEvent(instance_id="m-1", model="m", worker="w2", gpu_indexes=(0, 1), score=87.5,
                      breakdown={"placement": 80.0, "locality": 7.5}, attempt=1, latency_ms=12.34, at=T0),
        "22:13:20 placed        m m-1 -> w2 GPU 0,1  score 87.5 (locality 7.5, placement 80)  12.3 ms, attempt 1",
    ),
    (
        subjects.EVENT_UNSCHEDULABLE,
        UnschedulableEvent(instance_id="m-2", model="m", message="no GPU has room", at=T0),
        "22:13:20 unschedulable m m-2: no GPU has room",
    ),
    (
        subjects.EVENT_INSTANCE_PROGRESS,
        InstanceEvent(instance=Instance(id="m-3", model="m", state=InstanceState.RUNNING, worker="w1",
                                        gpu_indexes=(3,)), at=T0),
        "22:13:20 instance      m m-3 RUNNING on w1 GPU 3",
    ),
    (
        subjects.EVENT_INSTANCE,
        InstanceEvent(instance=Instance(id="m-4", model="m", reason="waiting for files"), at=T0),
        "22:13:20 instance      m m-4 PENDING (waiting for files)",
    ),
    (
        subjects.EVENT_INSTANCE,
        InstanceEvent(instance=Instance(id="m-5", model="m"), removed=True, at=T0),
        "22:13:20 removed       m m-5",
    ),
    (subjects.EVENT_CORDON, CordonEvent(worker="w1", cordoned=True, gpu_index=2), "22:13:20 cordoned      w1:2"),
    (subjects.EVENT_CORDON, CordonEvent(worker="w1", cordoned=False), "22:13:20 uncordoned    w1"),
    (subjects.EVENT_MODEL, ModelEvent(model="m", replicas=4), "22:13:20 model         m replicas=4"),
    (
        subjects.dead_letter("reconciler"),
        ErrorEvent(service="reconciler", subject="gantry.cmd.scale", reason="negative replicas", at=T0),
        "22:13:20 rejected      by reconciler on gantry.cmd.scale: negative replicas",
    ),
]


@pytest.mark.parametrize(("subject", "event", "line"), CASES, ids=[line.split()[1] for _, _, line in CASES])
def test_each_event_renders_as_one_line(subject: str, event: object, line: str) -> None:
    body: object = event
    if isinstance(event, InstanceEvent):
        body = InstanceEvents(events=(event,))
    elif isinstance(event, DecisionEvent):
        body = DecisionEvents(events=(event,))
    elif isinstance(event, ModelEvent):
        body = ModelEvents(events=(event,))
    (decoded,) = decode_events(subject, encode(body))  # type: ignore[arg-type]
    assert decoded == event
    assert format_event(decoded, stored_at=T0) == line


def test_a_batch_of_instance_changes_reads_as_one_event_each_in_order() -> None:
    changes = tuple(InstanceEvent(instance=Instance(id=f"m-{k}", model="m"), at=T0) for k in range(3))
    decoded = decode_events(subjects.EVENT_INSTANCE, encode(InstanceEvents(events=changes)))
    assert [e.instance.id for e in decoded] == ["m-0", "m-1", "m-2"]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("subject", "data"),
    [("gantry.events.unknown", b"{}"), (subjects.EVENT_DECISION, b"not json"), (subjects.EVENT_MODEL, b'{"x":1}')],
)
def test_unknown_subjects_and_bad_payloads_are_skipped(subject: str, data: bytes) -> None:
    assert decode_events(subject, data) == []


def test_event_model_names_the_model_or_nothing() -> None:
    assert event_model(ModelEvent(model="m", replicas=1)) == "m"
    assert event_model(InstanceEvent(instance=Instance(id="i", model="x"))) == "x"
    assert event_model(CordonEvent(worker="w", cordoned=True)) == ""


def test_json_line_carries_subject_time_and_fields() -> None:
    line = json.loads(event_json(subjects.EVENT_MODEL, ModelEvent(model="m", replicas=2), T0))
    assert line == {"subject": subjects.EVENT_MODEL, "stored_at": T0,
                    "event": {"v": SCHEMA_VERSION, "model": "m", "replicas": 2, "spec": None}}


def test_a_removed_worker_is_one_line_about_no_model() -> None:
    from shared.bus.messages import WorkerRemovedEvent, encode
    from shared.bus.subjects import EVENT_WORKER_REMOVED

    (event,) = decode_events(EVENT_WORKER_REMOVED, encode(WorkerRemovedEvent(worker="x0", reason="silent")))
    assert event_model(event) == ""
    assert format_event(event, 0.0) == "--:--:-- worker gone   x0 (silent)"


@pytest.mark.parametrize(("args", "code"), [((), 130), (("--follow",), 0)])
def test_ctrl_c_interrupts_a_replay_of_events_but_is_how_following_them_ends(
        args: tuple[str, ...], code: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import typer

    from ops.cli import cluster
    from ops.cli.main import main

    def interrupted(go: object) -> None:  # what the CLI's runner makes of a Ctrl-C
        raise typer.Exit(130)

    monkeypatch.setattr(cluster, "run", interrupted)
    with pytest.raises(SystemExit) as ended:
        main(["events", *args])
    assert (ended.value.code or 0) == code
