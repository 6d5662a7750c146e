"""partial_offload: as many GGUF layers as fit on one worker's GPUs, the rest in RAM."""

from __future__ import annotations

from collections.abc import Sequence

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Backend, Candidate
from shared.core.placement.fitting.base import FitOutcome, FitStrategy, by_allocatable, candidate, type_groups
from shared.core.placement.requirements import gguf_layer_vram, gguf_partial
from shared.core.placement.snapshot import GpuView, WorkerView

OFFLOAD_BACKENDS = frozenset({Backend.LLAMA_CPP, Backend.CUSTOM})


class PartialOffload(FitStrategy):
    """Keeps the candidates with the most offloaded layers; layers split in proportion to free VRAM."""

    name = "partial_offload"

    def skip(self, ctx: PlacementContext) -> str | None:
        """Needs CPU offloading, an offload-capable backend and per-layer sizes."""
        if not ctx.model.cpu_offloading:
            return "CPU offloading is not enabled for this model"
        if ctx.model.backend not in OFFLOAD_BACKENDS:
            return f"{ctx.model.backend} cannot offload layers to the CPU"
        if ctx.req.gguf is None:
            return "per-layer sizes are unknown"
        if gguf_layer_vram(ctx.req.gguf) <= 0:  # nothing to offload layer by layer (and no layer size to divide by)
            return "its layers take no VRAM"
        return None

    def _layers(self, gpus: Sequence[GpuView], per_layer: int, total: int) -> tuple[list[GpuView], list[int]]:
        """Greedy: biggest GPUs first, each taking the whole layers its free VRAM holds."""
        used: list[GpuView] = []
        counts: list[int] = []
        remaining = total
        for gpu in by_allocatable(gpus):
            if remaining == 0:
                break
            k = min(max(gpu.allocatable, 0) // per_layer, remaining)
            if k > 0:
                used.append(gpu)
                counts.append(k)
                remaining -= k
        return used, counts

    def fit(self, ctx: PlacementContext, workers: Sequence[WorkerView]) -> FitOutcome:
        """Per worker and GPU type, the most layers that fit while the rest fits in RAM."""
        out = FitOutcome()
        spec = ctx.req.gguf
        assert spec is not None  # skip() guarantees it
        per_layer = gguf_layer_vram(spec)
        found: list[Candidate] = []
        for view in workers:
            for group in type_groups(ctx, view):
                gpus, counts = self._layers(group, per_layer, spec.total_layers)
                k = sum(counts)
                if k == 0:
                    continue
                _, ram = gguf_partial(spec, k)
                ram += ctx.req.ram
                if view.ram_allocatable < ram or (ctx.req.cpu > 0 and view.cpu_allocatable < ctx.req.cpu):
                    continue
                claims = [c * per_layer for c in counts]
                found.append(
                    candidate(view.name, gpus, claims, ram, self.name, total_layers=spec.total_layers, offload_layers=k,
                              cpu=ctx.req.cpu)
                )
        if found:
            most = max(c.offload_layers or 0 for c in found)
            out.candidates = [c for c in found if c.offload_layers == most]
        else:
            out.notes.append(f"no GPU holds one {per_layer / (1 << 30):.2f} GiB layer with the rest fitting in RAM")
        return out
