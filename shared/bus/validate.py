"""Semantic checks of bus input beyond decoding: each returns a one-line reason, or None if valid."""

from __future__ import annotations

from shared.bus.messages import Heartbeat, ScaleCommand, WorkerRegistration
from shared.core.placement.domain import ModelSpec, Worker

# Worker names become NATS subject tokens (commands to one worker), so they may not hold '.', '*' or '>'.
# Model names enter ids and ledger fields joined by ':', '|' and ';', and subjects through instance ids
# (a model server's metrics): dots are fine there (more tokens), wildcards are not.
_BAD_MODEL_CHARS = frozenset(":|; \t\n*>")
_BAD_WORKER_CHARS = _BAD_MODEL_CHARS | frozenset(".")
_MAX_NAME = 200


def _bad(kind: str, name: str, forbidden: frozenset[str]) -> str | None:
    if not name:
        return f"empty {kind} name"
    if len(name) > _MAX_NAME:
        return f"invalid {kind} name {name[:40]!r}...: longer than {_MAX_NAME} characters"
    if set(name) & forbidden:
        shown = ", ".join(repr(c) for c in sorted(forbidden) if c.strip())
        return f"invalid {kind} name {name!r}: no spaces or {shown}"
    return None


def bad_model_name(name: str) -> str | None:
    """A model name may hold dots (``llama-3.1-8b``) but no id or ledger separators."""
    return _bad("model", name, _BAD_MODEL_CHARS)


def bad_worker_name(name: str) -> str | None:
    """A worker name is also a subject token: no dots or wildcards either."""
    return _bad("worker", name, _BAD_WORKER_CHARS)


def check_scale(cmd: ScaleCommand, known: ModelSpec | None) -> str | None:
    """A scale command needs a sane name, replicas ≥ 0, and a spec unless the model is known."""
    reason = bad_model_name(cmd.model)
    if reason:
        return f"scale: {reason}"
    if cmd.replicas < 0:
        return f"scale {cmd.model}: negative replicas ({cmd.replicas})"
    if cmd.spec is not None and cmd.spec.name != cmd.model:
        return f"scale {cmd.model}: spec is for model {cmd.spec.name!r}"
    if cmd.spec is None and known is None:
        return f"scale {cmd.model}: unknown model (send its spec with the first scale command)"
    return None


def check_registration(reg: WorkerRegistration) -> str | None:
    """Inventory sanity: plain name, unique GPU indexes, non-negative sizes."""
    w: Worker = reg.worker
    reason = bad_worker_name(w.name)
    if reason:
        return f"register: {reason}"
    indexes = [g.index for g in w.gpus]
    if len(set(indexes)) != len(indexes):
        return f"register {w.name}: duplicate GPU indexes {indexes}"
    for g in w.gpus:
        if g.index < 0 or g.vram_total < 0 or g.vram_used < 0:
            return f"register {w.name}: negative value on gpu{g.index}"
    if w.ram_total < 0 or w.ram_used < 0:
        return f"register {w.name}: negative RAM"
    return None


def check_heartbeat(hb: Heartbeat, inventory: Worker | None) -> str | None:
    """A heartbeat must come from a registered worker and name only GPUs it registered."""
    if inventory is None:
        return f"heartbeat from unknown worker {hb.worker!r} (register first)"
    known = {g.index for g in inventory.gpus}
    unknown = [u.index for u in hb.gpus if u.index not in known]
    if unknown:
        return f"heartbeat from {hb.worker} for unknown GPUs {unknown} (registered: {sorted(known)})"
    if hb.ram_used < 0 or any(u.vram_used < 0 for u in hb.gpus):
        return f"heartbeat from {hb.worker}: negative usage"
    return None
