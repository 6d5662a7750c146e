"""Every NATS subject Gantry uses, declared once.

Durable traffic (scale commands, the placement pipeline, instance status) lives on JetStream streams
declared in :mod:`shared.bus.streams`; heartbeats, worker commands and events use core NATS (events are
also captured by a stream so operators can replay them).
"""

from __future__ import annotations

PREFIX = "gantry"

# -- operator commands (JetStream, stream CMD) -------------------------------------------------------
SCALE = f"{PREFIX}.cmd.scale"
"""ScaleCommand: desired replicas of a model (with its spec when new or changed)."""
CORDON = f"{PREFIX}.cmd.cordon"
"""CordonCommand: cordon/uncordon a worker or one of its GPUs."""
REMOVE_WORKER = f"{PREFIX}.cmd.worker.remove"
"""RemoveWorkerCommand: forget a silent worker and everything placed on it (``gantry workers remove``)."""
CMD_ALL = f"{PREFIX}.cmd.>"

# -- worker reports --------------------------------------------------------------------------------
# Every report carries its worker's name as a subject token, so that the bus itself can let a worker's
# identity publish only its own reports (NATS per-subject permissions, docs/security.md); the state writer
# and the snapshot feeds drop a report whose payload names another worker than its subject.
_WORKER = f"{PREFIX}.worker"
WORKER_TOKEN = 2
"""Index of the worker's name among the dot-separated tokens of a worker report subject."""


def worker_register(worker: str) -> str:
    """WorkerRegistration (core NATS) of ``worker``: its full inventory; sent at start and every few heartbeats."""
    return f"{_WORKER}.{worker}.register"


def worker_heartbeat(worker: str) -> str:
    """Heartbeat (core NATS) of ``worker``: light liveness + usage report."""
    return f"{_WORKER}.{worker}.heartbeat"


def worker_files(worker: str) -> str:
    """ModelFileUpdate (core NATS) of ``worker``: readiness of a model's files there."""
    return f"{_WORKER}.{worker}.files"


def instance_status(worker: str) -> str:
    """InstanceStatus (JetStream, stream STATUS): ``worker``'s report on one of its instances."""
    return f"{PREFIX}.instance.status.{worker}"


REGISTER = worker_register("*")
"""Every worker's registrations (subscriptions)."""
HEARTBEAT = worker_heartbeat("*")
"""Every worker's heartbeats (subscriptions)."""
MODEL_FILE = worker_files("*")
"""Every worker's model-file reports (subscriptions)."""
INSTANCE_STATUS = instance_status("*")
"""Every worker's instance reports (the STATUS stream and its consumer)."""
INSTANCE_STATUS_WORKER_TOKEN = 3
SYNC = f"{_WORKER}.sync"
"""SyncRequest (core NATS): asks workers (all, or one) to re-register now, e.g. when a reconciler starts."""


def reporting_worker(subject: str, token: int = WORKER_TOKEN) -> str:
    """The worker a report's subject speaks for ('' if the subject has no such token)."""
    parts = subject.split(".")
    return parts[token] if len(parts) > token else ""


# -- placement pipeline (JetStream, stream PIPE) ---------------------------------------------------
PLACEMENT_REQUESTED = f"{PREFIX}.placement.requested"
PLACEMENT_FILTERED = f"{PREFIX}.placement.filtered"
PLACEMENT_FITTED = f"{PREFIX}.placement.fitted"
PLACEMENT_SCORED = f"{PREFIX}.placement.scored"
PIPE_ALL = f"{PREFIX}.placement.>"

# -- commands to one worker (core NATS; the reconciler re-sends from state, level-triggered) -------
_WORKER_CMD = f"{PREFIX}.agent"


def worker_assign(worker: str) -> str:
    """AssignInstance for ``worker``: start this instance."""
    return f"{_WORKER_CMD}.{worker}.assign"


def worker_drain(worker: str) -> str:
    """DrainInstance for ``worker``: stop taking requests, report when idle."""
    return f"{_WORKER_CMD}.{worker}.drain"


def worker_delete(worker: str) -> str:
    """DeleteInstance for ``worker``: stop and remove this instance."""
    return f"{_WORKER_CMD}.{worker}.delete"


WORKER_CMD_ALL = f"{_WORKER_CMD}.*.*"

# -- events (core NATS, captured by stream EVENTS) -------------------------------------------------
EVENTS_ALL = f"{PREFIX}.events.>"
EVENT_DECISION = f"{PREFIX}.events.decision"
"""DecisionEvents: replicas were placed (committed), each with its score breakdown (a batch)."""
EVENT_UNSCHEDULABLE = f"{PREFIX}.events.unschedulable"
"""UnschedulableEvent: a replica stays PENDING, with the core's explanation."""
EVENT_INSTANCE = f"{PREFIX}.events.instance.changed"
"""InstanceEvents: instances were created, placed, released or removed, or moved to a state that changes what
they hold (a batch, in order)."""
EVENT_INSTANCE_PROGRESS = f"{PREFIX}.events.instance.progress"
"""InstanceEvents: placed instances moved between SCHEDULED, STARTING and RUNNING (claims unchanged)."""
EVENT_INSTANCE_ALL = f"{PREFIX}.events.instance.>"
"""Both instance subjects in one subscription, so their events are applied in publish order."""
EVENT_CORDON = f"{PREFIX}.events.cordon"
"""CordonEvent: cordon state changed (services update their snapshots)."""
EVENT_MODEL = f"{PREFIX}.events.model"
"""ModelEvents: desired replicas / spec of models changed (a batch)."""
EVENT_WORKER_REMOVED = f"{PREFIX}.events.worker.removed"
"""WorkerRemovedEvent: a worker left the state (silent past forget_after, or removed by an operator)."""
EVENT_WORKER_REGISTERED = f"{PREFIX}.events.worker.registered"
"""WorkerRegisteredEvent: the state writer stored a worker's inventory (after refusing changes under claims);
every snapshot follows these, never raw registrations, so feeds, Redis and the ledger agree on it."""

# -- dead letters (core NATS, captured by stream DLQ) ----------------------------------------------
DEAD_LETTER = f"{PREFIX}.deadletter"
DEAD_LETTER_ALL = f"{PREFIX}.deadletter.>"


def dead_letter(service: str) -> str:
    """Where ``service`` reports a message it rejected (ErrorEvent)."""
    return f"{DEAD_LETTER}.{service}"


# -- model servers (core NATS) ---------------------------------------------------------------------
ENGINE_METRICS = f"{PREFIX}.engine.metrics"
"""EngineMetrics (core NATS): a model server's load, every 50-100 ms; one subject per instance below."""
ENGINE_METRICS_ALL = f"{ENGINE_METRICS}.>"
"""Every model server's metrics: ``>``, since an instance id holds its model's name, which may hold dots."""


def engine_metrics(instance: str) -> str:
    """Where the model server of ``instance`` publishes its EngineMetrics (one token per dotted part of the
    id: ``llama-3.1-8b-…`` spans three)."""
    return f"{ENGINE_METRICS}.{instance}"


ENGINE_KV_EVENTS = f"{PREFIX}.engine.kv"
"""EngineKVEvents (core NATS): a model server's KV-cache events (vLLM's schema), per step; one subject per
instance below. Numbered per instance, so a consumer sees a gap and rebuilds that instance's index."""
ENGINE_KV_EVENTS_ALL = f"{ENGINE_KV_EVENTS}.>"


def engine_kv_events(instance: str) -> str:
    """Where the model server of ``instance`` publishes its KV-cache events."""
    return f"{ENGINE_KV_EVENTS}.{instance}"


ENGINE_KV_SNAPSHOT = f"{PREFIX}.engine.kvsnap"
"""KVSnapshotRequest -> EngineKVSnapshot (core NATS request/reply): what a model server's prefix cache holds now,
asked by a picker that first sees it (a late or restarted replica would otherwise be blind to it until new
KV events); one subject per instance below, answered by that instance's server only."""
ENGINE_KV_SNAPSHOT_ALL = f"{ENGINE_KV_SNAPSHOT}.>"


def engine_kv_snapshot(instance: str) -> str:
    """Where the model server of ``instance`` answers requests for its prefix-cache snapshot."""
    return f"{ENGINE_KV_SNAPSHOT}.{instance}"


GATEWAY_OUTCOMES = f"{PREFIX}.gateway.outcomes"
"""EndpointOutcomes (core NATS, every gateway replica): engines that failed requests at one replica, or served again
after failing, counted by every other replica as its own, so an engine failing every request is left out after three
failures in all rather than three per replica; each second, too, the engines a replica counts as failing (for
replicas started later). Stale by at most ``OUTCOMES_EVERY_S`` (the gateway's) and a NATS hop; a message sent more
than ``MAX_LATE_S`` ago is dropped."""


# -- the endpoint picker (core NATS request/reply) --------------------------------------------------
PICK = f"{PREFIX}.picker.pick"
"""PickRequest → PickReply (request/reply): where each request goes. Picker replicas share it as a queue group."""
PICK_QUEUE = "picker"
"""The picker replicas' queue group on ``PICK`` (each request answered by one replica)."""
PICK_PROGRESS = f"{PREFIX}.picker.progress"
"""PickProgress (core NATS, every replica): first tokens and ends of picked requests (in-flight accounting)."""
PICKER_OUTCOMES = f"{PREFIX}.picker.outcomes"
"""EndpointOutcomes (core NATS, every NATS picker replica): what ``GATEWAY_OUTCOMES`` is to the gateway's replicas.
A request's failure reaches every replica in ``PICK_PROGRESS``, but only the replica that placed it knows where."""
