"""The one vocabulary of instance and worker life: which states count, hold, serve; liveness; the current spec;
the instance a decision creates; backoff.

Services, the CLI and the views import these instead of writing their own sets or precedence orders, so a
GPU held in the ledger is shown held everywhere and every process agrees on what a replica is.
"""

from __future__ import annotations

from collections.abc import Mapping

from shared.core.placement.domain import Decision, Instance, InstanceState, ModelSpec, WorkerState

S = InstanceState

# Count towards a model's replicas: everything except replicas on their way out. An ERROR replica counts
# until it is replaced (see the planner's restart policy), so a failure does not double the claims at once.
ACTIVE = frozenset({S.PENDING, S.SCHEDULED, S.STARTING, S.RUNNING, S.ERROR})
# Placed and expected to run on its worker: the worker should report it in its heartbeats.
ON_WORKER = frozenset({S.SCHEDULED, S.STARTING, S.RUNNING})
# Claims live in the ledger (an UNREACHABLE replica's claims were released when it was declared lost).
HOLDS_GPUS = frozenset({S.SCHEDULED, S.STARTING, S.RUNNING, S.DRAINING, S.ERROR})
# Answering requests: only RUNNING. ERROR is never serving, even while it still counts and holds.
SERVING = frozenset({S.RUNNING})
# A worker may keep running these (the resync never deletes them from it).
KEPT_ON_WORKER = ON_WORKER | {S.DRAINING, S.ERROR}


def worker_state(cordoned: bool, last_heartbeat: float, now: float, not_ready_after: float) -> WorkerState:
    """Spec §2: MAINTENANCE when cordoned, READY while the last heartbeat is younger than ``not_ready_after``."""
    if cordoned:
        return WorkerState.MAINTENANCE
    if now - last_heartbeat < not_ready_after:
        return WorkerState.READY
    return WorkerState.NOT_READY


def silent_for(last_heartbeat: float | None, now: float) -> float:
    """Seconds since a worker's last heartbeat (infinite when it was never heard)."""
    return float("inf") if last_heartbeat is None else now - last_heartbeat


def current_spec(
    command: ModelSpec | None = None, cached: ModelSpec | None = None, stored: ModelSpec | None = None
) -> ModelSpec | None:
    """The spec to act on: a command's own spec, else this process's latest copy, else the stored one.

    A command carrying a spec is the newest word on the model; the cache holds what the last command this
    process applied said; Redis holds what some process stored (possibly before that command).
    """
    return command or cached or stored


def desired_of(desired: Mapping[str, int], model: str) -> int:
    """A model's desired replicas (0 when the model was never scaled): the stored count is the one source."""
    return desired.get(model, 0)


def instance_from_decision(
    decision: Decision, instance_id: str, *, created_at: float = 0.0, state: InstanceState = S.SCHEDULED
) -> Instance:
    """The instance a committed decision creates (claims as decided)."""
    c = decision.candidate
    return Instance(
        id=instance_id,
        model=decision.model,
        state=state,
        worker=c.worker,
        gpu_indexes=c.gpu_indexes,
        vram_claims=c.vram_claims,
        ram_claim=c.ram_claim,
        subordinates=c.subordinates,
        total_layers=c.total_layers,
        offload_layers=c.offload_layers,
        created_at=created_at,
        cpu_claim=c.cpu_claim,
    )


def backoff(base: float, attempt: int, cap: float = float("inf")) -> float:
    """``base × 2^attempt``, capped: the one backoff of commit retries, PENDING retries and restarts."""
    if attempt <= 0:
        return min(base, cap)
    return min(cap, base * 2.0 ** min(attempt, 60))
