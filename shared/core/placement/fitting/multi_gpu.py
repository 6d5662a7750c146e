"""multi_gpu: one worker, several GPUs of one type; only the candidates with the fewest GPUs are kept."""

from __future__ import annotations

from collections.abc import Sequence

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Candidate
from shared.core.placement.fitting.base import (
    FitOutcome,
    FitStrategy,
    by_allocatable,
    candidate,
    full_claims,
    qualifies,
    ram_short,
    type_groups,
)
from shared.core.placement.requirements import tp_divisible
from shared.core.placement.snapshot import WorkerView


class MultiGpu(FitStrategy):
    """Takes qualifying GPUs by allocatable VRAM, largest first, until V is covered at a valid TP size."""

    name = "multi_gpu"

    def skip(self, ctx: PlacementContext) -> str | None:
        """Not when exactly one GPU is asked for."""
        if ctx.req.gpu_count == 1:
            return "the parallel sizes ask for 1 GPU"
        return None

    def sizes(self, ctx: PlacementContext, available: int) -> list[int]:
        """GPU counts to try, smallest first: the world size if given, else valid tensor-parallel sizes."""
        count = ctx.req.gpu_count
        if count is not None:
            return [count] if count <= available else []
        return [n for n in range(1, available + 1) if tp_divisible(n, ctx.req)]

    def fit(self, ctx: PlacementContext, workers: Sequence[WorkerView]) -> FitOutcome:
        """Per worker and GPU type, the first (smallest) GPU set that holds the replica."""
        out = FitOutcome()
        ram = ctx.req.ram
        found: list[Candidate] = []
        for view in workers:
            if ram_short(ctx, view, ram):
                continue
            for group in type_groups(ctx, view):
                ordered = by_allocatable([g for g in group if qualifies(ctx, g)])
                for n in self.sizes(ctx, len(ordered)):
                    claims = full_claims(ctx, ordered[:n])
                    if claims is not None:
                        found.append(candidate(view.name, ordered[:n], claims, ram, self.name))
                        break
        if found:
            fewest = min(len(c.gpu_indexes) for c in found)
            out.candidates = [c for c in found if len(c.gpu_indexes) == fewest]
        return out
