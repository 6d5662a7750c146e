"""Semantic checks of bus input beyond decoding: each returns a one-line reason, or None if valid."""

from __future__ import annotations

from collections.abc import Mapping

from shared.bus.messages import Heartbeat, ScaleCommand, WorkerRegistration
from shared.core.limits import MAX_GPU_KINDS_PER_WORKER, MAX_GPU_NAME, MAX_REPLICAS, bad_model_name, bad_worker_name
from shared.core.placement.domain import ModelSpec, Worker

__all__ = [
    "bad_model_name", "bad_worker_name", "check_heartbeat", "check_inventory_change", "check_registration",
    "check_scale", "impersonation",
]


def check_scale(cmd: ScaleCommand, known: ModelSpec | None) -> str | None:
    """A scale command needs a sane name, replicas ≥ 0, and a spec unless the model is known."""
    reason = bad_model_name(cmd.model)
    if reason:
        return f"scale: {reason}"
    if cmd.replicas < 0:
        return f"scale {cmd.model}: negative replicas ({cmd.replicas})"
    if cmd.replicas > MAX_REPLICAS:
        return f"scale {cmd.model}: {cmd.replicas} replicas, more than the limit of {MAX_REPLICAS}"
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
        if len(g.vendor) > MAX_GPU_NAME or len(g.product) > MAX_GPU_NAME:
            return f"register {w.name}: gpu{g.index}'s vendor or product is longer than {MAX_GPU_NAME} characters"
    if len(w.cluster) > MAX_GPU_NAME:  # interned for good by every service, as the GPU kinds
        return f"register {w.name}: cluster name longer than {MAX_GPU_NAME} characters"
    # every service interns each vendor and (vendor, product) it meets for good: a machine has a few kinds
    kinds = {(g.vendor, g.product) for g in w.gpus}
    if len(kinds) > MAX_GPU_KINDS_PER_WORKER:
        return f"register {w.name}: {len(kinds)} kinds of GPU (vendor, product), more than {MAX_GPU_KINDS_PER_WORKER}"
    if w.ram_total < 0 or w.ram_used < 0:
        return f"register {w.name}: negative RAM"
    return None


def check_heartbeat(hb: Heartbeat, inventory: Worker | None) -> str | None:
    """A heartbeat must come from a registered worker and name only GPUs it registered, each once."""
    if inventory is None:
        return f"heartbeat from unknown worker {hb.worker!r} (register first)"
    known = {g.index for g in inventory.gpus}
    named = {u.index for u in hb.gpus}
    if len(named) != len(hb.gpus):  # two figures for one GPU: neither can be trusted
        return f"heartbeat from {hb.worker}: duplicate GPU indexes {[u.index for u in hb.gpus]}"
    if not named <= known:
        return f"heartbeat from {hb.worker} for unknown GPUs {sorted(named - known)} (registered: {sorted(known)})"
    if hb.ram_used < 0 or any(u.vram_used < 0 for u in hb.gpus):
        return f"heartbeat from {hb.worker}: negative usage"
    return None


def impersonation(named: str, sender: str) -> str | None:
    """A worker report must name the worker whose subject it came on: the bus lets an identity publish
    only on its own worker's subjects, so a payload naming another worker is a forgery."""
    if named != sender:
        return f"report for worker {named!r} sent on worker {sender!r}'s subject (impersonation refused)"
    return None


def check_inventory_change(
    old: Worker | None, new: Worker, claimed: Mapping[int, int], ram_claimed: int = 0
) -> str | None:
    """A worker holding claims may not change what it claimed on: a GPU that holds claims must stay, with
    the same VRAM, until its instances are gone (Nomad and the kubelet refuse the same for a node in use), and its
    RAM may not fall below what is claimed of it. A new worker, or GPUs without claims, may change freely (so a
    worker's own next registration always repairs an inventory that was wrong while nothing was placed on it)."""
    if old is None:
        return None
    before = {g.index: g.vram_total for g in old.gpus}
    after = {g.index: g.vram_total for g in new.gpus}
    for index in sorted(i for i, claim in claimed.items() if claim > 0):
        if index not in after:
            return f"register {new.name}: gpu{index} holds claims ({claimed[index]} B) but left the inventory"
        if index in before and after[index] != before[index]:
            return (f"register {new.name}: gpu{index} VRAM changed from {before[index]} to {after[index]} B "
                    f"while it holds claims ({claimed[index]} B)")
    if new.ram_total < ram_claimed:
        return (f"register {new.name}: RAM shrank from {old.ram_total} to {new.ram_total} B while it holds claims "
                f"({ram_claimed} B)")
    return None
