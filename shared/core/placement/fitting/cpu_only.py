"""cpu_only: the whole model in RAM, on workers with enough of it."""

from __future__ import annotations

from collections.abc import Sequence

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Candidate
from shared.core.placement.fitting.base import FitOutcome, FitStrategy
from shared.core.placement.fitting.partial_offload import OFFLOAD_BACKENDS
from shared.core.placement.requirements import gguf_cpu_ram, gib
from shared.core.placement.snapshot import WorkerView


class CpuOnly(FitStrategy):
    """A worker's RAM instead of GPUs (CPU offloading models only)."""

    name = "cpu_only"

    def skip(self, ctx: PlacementContext) -> str | None:
        """Needs CPU offloading and a backend that can run on the CPU."""
        if not ctx.model.cpu_offloading:
            return "CPU offloading is not enabled for this model"
        if ctx.model.backend not in OFFLOAD_BACKENDS:
            return f"{ctx.model.backend} cannot run on the CPU"
        return None

    def ram_needed(self, ctx: PlacementContext) -> int:
        """All layers and non-layer weights (GGUF), else the VRAM estimate, plus any explicit RAM claim."""
        spec = ctx.req.gguf
        base = gguf_cpu_ram(spec) if spec is not None else ctx.req.vram
        return base + ctx.req.ram

    def fit(self, ctx: PlacementContext, workers: Sequence[WorkerView]) -> FitOutcome:
        """Every worker whose allocatable RAM holds the model."""
        need = self.ram_needed(ctx)
        spec = ctx.req.gguf
        layers = spec.total_layers if spec is not None else None
        out = FitOutcome()
        out.candidates = [
            Candidate(
                worker=v.name,
                gpu_indexes=(),
                vram_claims=(),
                ram_claim=need,
                strategy=self.name,
                total_layers=layers,
                offload_layers=0 if layers is not None else None,
            )
            for v in workers
            if v.ram_allocatable >= need
        ]
        if not out.candidates:
            best = max((v.ram_allocatable for v in workers), default=0)
            out.notes.append(f"CPU only needs {gib(need)} GiB RAM; largest allocatable RAM {gib(best)} GiB")
        return out
