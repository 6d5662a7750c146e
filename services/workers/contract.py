"""What an (emulated) GPU worker consumes and emits: the protocol a real worker agent speaks too."""

from __future__ import annotations

from shared.bus import subjects
from shared.bus.messages import (
    AssignInstances,
    DeleteInstance,
    DrainInstance,
    Heartbeat,
    InstanceReports,
    ModelFileUpdate,
    SyncRequest,
    WorkerRegistration,
)
from shared.host.contract import Consumes, Contract, Emits

CONTRACT = Contract(
    service="workers",
    description="GPU workers (emulated in dev): report inventory, usage and instances; run what they are told.",
    consumes=(
        Consumes(subjects.worker_assign("*"), AssignInstances, "start instances (the token is the worker name; a "
                 "lone AssignInstance is an assignment of one)"),
        Consumes(subjects.worker_drain("*"), DrainInstance, "stop routing new requests to an instance"),
        Consumes(subjects.worker_delete("*"), DeleteInstance, "stop and remove an instance"),
        Consumes(subjects.SYNC, SyncRequest, "register again now (every worker, or the one named)"),
    ),
    emits=(
        Emits(subjects.REGISTER, WorkerRegistration, "the worker's full inventory"),
        Emits(subjects.HEARTBEAT, Heartbeat, "liveness, usage per GPU, instances held"),
        Emits(subjects.MODEL_FILE, ModelFileUpdate, "readiness of a model's files on this worker"),
        Emits(subjects.INSTANCE_STATUS, InstanceReports, "instances' states, those reported at one moment together "
              "(deduplicated by content)", jetstream=True),
    ),
)
