"""placement (max 1) as a keep-preference: binpack keeps the fullest bins, spread trims the most crowded.

binpack: the highest claimed fraction of VRAM over the instance's GPUs (RAM for CPU instances).
spread: ``0.85·inv(replicas of the model on the worker) + 0.15·inv(max replicas on its GPUs)``, normalised
over the instances ranked, so the most crowded worker/GPU scores 0 and is trimmed first.
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Instance, PlacementStrategy
from shared.core.placement.scaledown.base import ScaleDownScorer
from shared.core.placement.scorers.base import inv


def _parts(instance: Instance) -> list[tuple[str, tuple[int, ...]]]:
    parts = [(instance.worker, instance.gpu_indexes)] if instance.worker else []
    return parts + [(s.worker, s.gpu_indexes) for s in instance.subordinates]


def fullness(ctx: PlacementContext, instance: Instance) -> float:
    """Largest claimed fraction of any GPU (or of RAM) the instance occupies, capped at 1."""
    snap = ctx.snapshot
    best = 0.0
    for name, indexes in _parts(instance):
        worker = snap.worker(name)
        if worker is None:
            continue
        totals = {g.index: g.vram_total for g in worker.gpus}
        for index in indexes:
            if totals.get(index):
                best = max(best, snap.gpu_claimed(name, index) / totals[index])
        if not indexes and worker.ram_total:
            best = max(best, snap.ram_claimed(name) / worker.ram_total)
    return min(best, 1.0)


class PlacementKeep(ScaleDownScorer):
    """The model's placement policy read as a keep-preference."""

    name = "placement"
    max_score = 1.0

    def score(self, ctx: PlacementContext, instances: Sequence[Instance]) -> list[float]:
        """Per instance."""
        # auto packs like binpack: removing replicas from the emptiest workers frees whole GPUs first
        if ctx.model.placement_strategy in (PlacementStrategy.BINPACK, PlacementStrategy.AUTO):
            return [fullness(ctx, i) for i in instances]
        snap, model = ctx.snapshot, ctx.model.name
        crowd_w = [snap.worker_counts(model, i.worker)[0] if i.worker else 0 for i in instances]
        crowd_g = [
            max((snap.gpu_counts(model, i.worker, g)[0] for g in i.gpu_indexes), default=0) if i.worker else 0
            for i in instances
        ]
        if not instances:
            return []
        wr, gr = (min(crowd_w), max(crowd_w)), (min(crowd_g), max(crowd_g))
        return [0.85 * inv(w, *wr) + 0.15 * inv(g, *gr) for w, g in zip(crowd_w, crowd_g, strict=True)]
