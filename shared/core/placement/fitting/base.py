"""The fit-strategy plugin interface and the helpers strategies share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Candidate, SubordinateWorker
from shared.core.placement.plugin_args import Configurable
from shared.core.placement.requirements import ceil_div
from shared.core.placement.snapshot import BoolArray, GpuView, WorkerView


@dataclass
class FitOutcome:
    """Candidates a strategy found, and notes on why others did not fit."""

    candidates: list[Candidate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class FitStrategy(Configurable, ABC):
    """Turns surviving workers into candidates, or explains why it could not."""

    name: ClassVar[str]

    def skip(self, ctx: PlacementContext) -> str | None:
        """A reason this strategy does not apply to the model, or None."""
        return None

    @abstractmethod
    def fit(self, ctx: PlacementContext, workers: Sequence[WorkerView]) -> FitOutcome:
        """Every candidate this strategy yields over ``workers`` (sorted by name)."""


def by_allocatable(gpus: Sequence[GpuView]) -> list[GpuView]:
    """GPUs by allocatable VRAM, largest first; index breaks ties."""
    return sorted(gpus, key=lambda g: (-g.allocatable, g.index))


def type_groups(ctx: PlacementContext, view: WorkerView) -> list[list[GpuView]]:
    """The worker's eligible GPUs grouped by (vendor, product): types are never mixed in a candidate."""
    groups: dict[tuple[str, str], list[GpuView]] = {}
    for gpu in view.gpus:
        if ctx.gpu_eligible(gpu):
            groups.setdefault(gpu.type_key, []).append(gpu)
    return [groups[key] for key in sorted(groups)]


def full_claims(ctx: PlacementContext, gpus: Sequence[GpuView]) -> tuple[int, ...] | None:
    """Claims on ``gpus`` for a full offload of one replica, or None if they cannot hold it.

    Utilisation backends claim ``floor(u × total)`` on every GPU, which must still be allocatable, and the
    claims must cover V. GGUF models split V in proportion to allocatable VRAM (llama.cpp's tensor split);
    others split it evenly (tensor-parallel shards), and every GPU must hold its share.
    """
    req = ctx.req
    if not gpus:
        return None
    if req.gpu_memory_utilization > 0:
        claims = tuple(ctx.full_claim(g) for g in gpus)
        if any(g.allocatable < c for g, c in zip(gpus, claims, strict=True)) or sum(claims) < req.vram:
            return None
        return claims
    if req.gguf is not None:  # llama.cpp splits tensors in proportion to free VRAM
        room = sum(max(g.allocatable, 0) for g in gpus)
        if room < req.vram or any(g.allocatable <= 0 for g in gpus):
            return None
        return tuple(ceil_div(req.vram * g.allocatable, room) for g in gpus)
    share = ceil_div(req.vram, len(gpus))
    if any(g.allocatable < share for g in gpus):
        return None
    return tuple(share for _ in gpus)


def qualifies(ctx: PlacementContext, gpu: GpuView) -> bool:
    """Has the utilisation headroom (utilisation backends) or any room at all (others)."""
    if ctx.req.gpu_memory_utilization > 0:
        return gpu.allocatable >= ctx.full_claim(gpu)
    return gpu.allocatable > 0


def candidate(
    worker: str,
    gpus: Sequence[GpuView],
    claims: Sequence[int],
    ram: int,
    strategy: str,
    *,
    subordinates: tuple[SubordinateWorker, ...] = (),
    total_layers: int | None = None,
    offload_layers: int | None = None,
    overcommit: str | None = None,
    cpu: int = 0,
) -> Candidate:
    """A candidate with GPU indexes in ascending order (claims kept parallel)."""
    indexes, ordered = _by_index(gpus, claims)
    return Candidate(
        worker=worker,
        gpu_indexes=indexes,
        vram_claims=ordered,
        ram_claim=ram,
        subordinates=subordinates,
        strategy=strategy,
        total_layers=total_layers,
        offload_layers=offload_layers,
        overcommit=overcommit,
        cpu_claim=cpu,
    )


def subordinate(worker: str, gpus: Sequence[GpuView], claims: Sequence[int], ram: int, cpu: int = 0
                ) -> SubordinateWorker:
    """A subordinate share with GPU indexes in ascending order."""
    indexes, ordered = _by_index(gpus, claims)
    return SubordinateWorker(worker=worker, gpu_indexes=indexes, vram_claims=ordered, ram_claim=ram, cpu_claim=cpu)


def _by_index(gpus: Sequence[GpuView], claims: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    pairs = sorted(zip((g.index for g in gpus), claims, strict=True))
    return tuple(i for i, _ in pairs), tuple(c for _, c in pairs)


def host_short(ctx: PlacementContext, view: WorkerView, need: int) -> bool:
    """The worker cannot give ``need`` bytes of RAM or the request's milli-cores (0 always fits)."""
    cpu = ctx.req.cpu
    return (need > 0 and view.ram_allocatable < need) or (cpu > 0 and view.cpu_allocatable < cpu)


def host_rows(ctx: PlacementContext, survivors: BoolArray) -> BoolArray:
    """Fast path of ``host_short``: survivors with the request's RAM and CPU."""
    snap, req = ctx.snapshot, ctx.req
    rows = snap.rows
    ok = survivors & (snap.w_ram_alloc[:rows] >= req.ram) if req.ram > 0 else survivors
    if req.cpu > 0:
        ok = ok & (snap.w_cpu_alloc[:rows] >= req.cpu)
    return ok
