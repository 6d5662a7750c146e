"""What the reconciler consumes and emits (its part of the contract; the host adds the snapshot feed's)."""

from __future__ import annotations

from shared.bus import streams, subjects
from shared.bus.messages import (
    AssignInstances,
    CordonCommand,
    CordonEvent,
    DecisionEvents,
    DeleteInstance,
    DrainInstance,
    Heartbeat,
    InstanceEvents,
    InstanceReports,
    ModelEvents,
    ModelFileUpdate,
    PlacementRequest,
    PlacementScored,
    RemoveWorkerCommand,
    ScaleCommand,
    SyncRequest,
    UnschedulableEvent,
    WorkerRegisteredEvent,
    WorkerRegistration,
    WorkerRemovedEvent,
)
from shared.host.contract import Consumes, Emits

WRITER_QUEUE = "gantry-state-writer"
"""Queue group of the state writer: reconciler replicas split the worker reports they write to Redis."""

CONSUMES = (
    Consumes(subjects.SCALE, ScaleCommand, "desired replicas of a model (and its spec)",
             stream=streams.STREAM_CMD, durable=streams.CONSUMER_SCALE),
    Consumes(subjects.CORDON, CordonCommand, "cordon or uncordon a worker or one GPU",
             stream=streams.STREAM_CMD, durable=streams.CONSUMER_SCALE),
    Consumes(subjects.REMOVE_WORKER, RemoveWorkerCommand, "forget a worker that is gone, and what it held",
             stream=streams.STREAM_CMD, durable=streams.CONSUMER_SCALE),
    Consumes(subjects.PLACEMENT_SCORED, PlacementScored, "decisions (or why none) to commit to the ledger",
             stream=streams.STREAM_SCORED, durable=streams.CONSUMER_COMMIT),
    Consumes(subjects.INSTANCE_STATUS, InstanceReports, "workers' reports on their instances (a lone InstanceStatus "
             "is read as a report of one)",
             stream=streams.STREAM_STATUS, durable=streams.CONSUMER_STATUS),
    Consumes(subjects.REGISTER, WorkerRegistration, "worker inventories, validated and written to Redis",
             queue=WRITER_QUEUE),
    Consumes(subjects.HEARTBEAT, Heartbeat, "worker liveness and usage, validated and written to Redis",
             queue=WRITER_QUEUE),
    Consumes(subjects.MODEL_FILE, ModelFileUpdate, "model-file readiness, written to Redis", queue=WRITER_QUEUE),
)

EMITS = (
    Emits(subjects.PLACEMENT_REQUESTED, PlacementRequest, "replicas to place, with their models' specs",
          jetstream=True),
    Emits(subjects.worker_assign("*"), AssignInstances, "start the instances committed to this worker (a lone "
          "AssignInstance for one)"),
    Emits(subjects.worker_drain("*"), DrainInstance, "stop routing to an instance; report when idle"),
    Emits(subjects.worker_delete("*"), DeleteInstance, "stop and remove an instance"),
    Emits(subjects.EVENT_DECISION, DecisionEvents, "replicas committed, with their score breakdowns"),
    Emits(subjects.EVENT_UNSCHEDULABLE, UnschedulableEvent, "a replica stays PENDING, and why"),
    Emits(subjects.EVENT_INSTANCE, InstanceEvents, "instances created, placed, released or removed"),
    Emits(subjects.EVENT_INSTANCE_PROGRESS, InstanceEvents, "placed instances starting and running"),
    Emits(subjects.EVENT_MODEL, ModelEvents, "desired replicas or specs of models changed"),
    Emits(subjects.EVENT_CORDON, CordonEvent, "cordon state of a worker or GPU changed"),
    Emits(subjects.EVENT_WORKER_REMOVED, WorkerRemovedEvent, "a worker left the state (forgotten or removed)"),
    Emits(subjects.EVENT_WORKER_REGISTERED, WorkerRegisteredEvent,
          "a worker's inventory as stored (the snapshots follow these, not raw registrations)"),
    Emits(subjects.SYNC, SyncRequest, "asks workers to register again: all at start (the state writer may have missed "
          "them), or one heard from but not stored; the only service allowed to (each ask costs every worker asked a "
          "registration)"),
)
