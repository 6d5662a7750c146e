"""cpu_only: the whole model in RAM, on workers with enough of it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Candidate
from shared.core.placement.fitting.base import FitOutcome, FitStrategy
from shared.core.placement.fitting.partial_offload import OFFLOAD_BACKENDS
from shared.core.placement.requirements import gguf_cpu_ram, gib
from shared.core.placement.snapshot import BoolArray, IntArray, WorkerView


@dataclass
class RowBatch:
    """CPU-only candidates as columns: the snapshot rows of the workers, all with the same RAM claim."""

    rows: IntArray
    ram_claim: int
    total_layers: int | None
    cpu_claim: int = 0

    def __len__(self) -> int:
        return len(self.rows)


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
                cpu_claim=ctx.req.cpu,
            )
            for v in workers
            if v.ram_allocatable >= need and v.cpu_allocatable >= ctx.req.cpu
        ]
        if not out.candidates:
            out.notes.append(self._note(need, max((v.ram_allocatable for v in workers), default=0)))
        return out

    @staticmethod
    def _note(need: int, best: int) -> str:
        return f"CPU only needs {gib(need)} GiB RAM; largest allocatable RAM {gib(best)} GiB"

    def batch_note(self, ctx: PlacementContext, survivors: BoolArray) -> str:
        """The reference path's note when no worker has the RAM, from the columns."""
        ram = ctx.snapshot.w_ram_alloc[: ctx.snapshot.rows][survivors]
        return self._note(self.ram_needed(ctx), int(ram.max()) if len(ram) else 0)

    def fit_batch(self, ctx: PlacementContext, survivors: BoolArray) -> RowBatch:
        """Fast path: survivors whose allocatable RAM holds the model."""
        need = self.ram_needed(ctx)
        snap = ctx.snapshot
        ok = survivors & (snap.w_ram_alloc[: snap.rows] >= need)
        if ctx.req.cpu > 0:
            ok &= snap.w_cpu_alloc[: snap.rows] >= ctx.req.cpu
        rows = np.flatnonzero(ok).astype(np.int64)
        spec = ctx.req.gguf
        return RowBatch(rows=rows, ram_claim=need, total_layers=spec.total_layers if spec is not None else None,
                        cpu_claim=ctx.req.cpu)
