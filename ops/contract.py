"""What the operator CLI (``gantry``) sends and reads on the bus (its part of the contract)."""

from __future__ import annotations

from ops.events import EVENT_TYPES
from shared.bus import subjects
from shared.bus.messages import CordonCommand, EngineMetrics, ErrorEvent, RemoveWorkerCommand, ScaleCommand
from shared.host.contract import Consumes, Contract, Emits

CONTRACT = Contract(
    service="cli",
    description="The operator CLI (gantry): scale, deploy, cordon and remove-worker commands; events and dead "
    "letters replayed from their streams (gantry events, explain, top); the engines' reports (gantry gateway "
    "--watch).",
    consumes=(
        *(Consumes(subject, kind, "replayed from the GANTRY_EVENTS stream") for subject, kind in EVENT_TYPES.items()),
        Consumes(subjects.DEAD_LETTER_ALL, ErrorEvent, "replayed from the GANTRY_DLQ stream (gantry events "
                 "--dead-letters)"),
        Consumes(subjects.ENGINE_METRICS_ALL, EngineMetrics, "the engines' load reports (gantry gateway --watch)"),
    ),
    emits=(
        Emits(subjects.SCALE, ScaleCommand, "gantry scale / deploy (deduplicated by request id)", jetstream=True),
        Emits(subjects.CORDON, CordonCommand, "gantry cordon / uncordon", jetstream=True),
        Emits(subjects.REMOVE_WORKER, RemoveWorkerCommand, "gantry workers remove", jetstream=True),
    ),
)
