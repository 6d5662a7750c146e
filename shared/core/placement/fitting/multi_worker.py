"""multi_worker: several workers with the same GPU count and type, each contributing all its GPUs."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from shared.core.placement.context import PlacementContext
from shared.core.placement.fitting.base import (
    FitOutcome,
    FitStrategy,
    candidate,
    host_short,
    qualifies,
    subordinate,
)
from shared.core.placement.requirements import ceil_div, gib, tp_divisible
from shared.core.placement.snapshot import GpuView, WorkerView


class MultiWorker(FitStrategy):
    """Distributed inference: feasible worker combinations, up to the profile's cap per GPU group."""

    name = "multi_worker"

    def skip(self, ctx: PlacementContext) -> str | None:
        """Only when the model allows distributed inference and needs more than one GPU."""
        if not ctx.model.distributed_inference_across_workers:
            return "distributed inference across workers is not enabled for this model"
        if ctx.req.gpu_count == 1:
            return "the parallel sizes ask for 1 GPU"
        return None

    def _groups(
        self, ctx: PlacementContext, workers: Sequence[WorkerView]
    ) -> dict[tuple[int, str, str], list[WorkerView]]:
        """Workers whose GPUs are all of one type, all eligible and all qualifying, by (count, type)."""
        groups: dict[tuple[int, str, str], list[WorkerView]] = {}
        for view in workers:
            gpus = view.gpus
            if not gpus or host_short(ctx, view, ctx.req.ram):
                continue
            types = {g.type_key for g in gpus}
            if len(types) != 1 or not all(ctx.gpu_eligible(g) and qualifies(ctx, g) for g in gpus):
                continue
            vendor, product = gpus[0].type_key
            groups.setdefault((len(gpus), vendor, product), []).append(view)
        return groups

    def _claims(self, ctx: PlacementContext, gpus: Sequence[GpuView], share: int) -> tuple[int, ...]:
        if ctx.req.gpu_memory_utilization > 0:
            return tuple(ctx.full_claim(g) for g in gpus)
        return tuple(share for _ in gpus)

    def fit(self, ctx: PlacementContext, workers: Sequence[WorkerView]) -> FitOutcome:
        """The smallest worker count per group that covers V (or meets the world size)."""
        out = FitOutcome()
        req = ctx.req
        limit = ctx.profile.max_worker_combinations
        for (per_worker, _, _), group in sorted(self._groups(ctx, workers).items()):
            if len(group) < 2 or not tp_divisible(per_worker, req):
                continue
            if req.gpu_count is not None:
                if req.gpu_count % per_worker or req.gpu_count // per_worker < 2:
                    continue
                sizes = [req.gpu_count // per_worker]
            else:
                sizes = list(range(2, len(group) + 1))
            for m in sizes:
                share = ceil_div(req.vram, m * per_worker)
                kept = 0
                for combo in itertools.combinations(group, m):
                    claims = [self._claims(ctx, v.gpus, share) for v in combo]
                    if sum(map(sum, claims)) < req.vram:
                        continue
                    if any(g.allocatable < c for v, cs in zip(combo, claims, strict=True)
                           for g, c in zip(v.gpus, cs, strict=True)):
                        continue
                    main, rest = combo[0], combo[1:]
                    subs = tuple(
                        subordinate(v.name, v.gpus, cs, req.ram, req.cpu)
                        for v, cs in zip(rest, claims[1:], strict=True)
                    )
                    out.candidates.append(
                        candidate(main.name, main.gpus, claims[0], req.ram, self.name, subordinates=subs, cpu=req.cpu)
                    )
                    kept += 1
                    if kept >= limit:
                        break
                if kept:
                    break
        if not out.candidates:
            note = self.closest(ctx, workers)
            if note:
                out.notes.append(note)
        return out

    def closest(self, ctx: PlacementContext, workers: Sequence[WorkerView]) -> str:
        """The multi-worker combination that came closest, and what it lacked ("" when no worker qualifies).

        Per group of workers with the same GPU count and type, the workers offering the most VRAM (claimable
        at the utilisation, else an even split bounded by the smallest GPU) are combined: the world size's
        worth of workers when given, else as many as it takes to cover V. The group covering the largest
        share of V is named, with its shortfall and the first reasons its workers fall short.
        """
        req = ctx.req
        u = req.gpu_memory_utilization
        groups: dict[tuple[int, str, str], list[tuple[int, str, list[str]]]] = {}
        for view in workers:
            gpus = [g for g in view.gpus if ctx.gpu_eligible(g)]
            if not gpus or len({g.type_key for g in gpus}) != 1:
                continue
            lacks = []
            if u > 0:
                offer = 0
                for g in gpus:
                    claim = ctx.full_claim(g)
                    if g.allocatable >= claim:
                        offer += claim
                    else:
                        lacks.append(f"{view.name}/gpu{g.index} lacks the {u * 100:.0f}% headroom")
            else:
                offer = len(gpus) * max(min(g.allocatable for g in gpus), 0)
            if len(gpus) != len(view.gpus):
                lacks.append(f"{view.name} has GPUs this model cannot use")
            if host_short(ctx, view, req.ram):
                lacks.append(f"{view.name} is short of RAM or CPU")
            vendor, product = gpus[0].type_key
            groups.setdefault((len(gpus), vendor, product), []).append((offer, view.name, lacks))
        best: tuple[float, str, str] | None = None
        for (per_worker, _, product), members in sorted(groups.items()):
            members.sort(key=lambda m: (-m[0], m[1]))
            if req.gpu_count is not None and req.gpu_count % per_worker == 0:
                take = members[: max(req.gpu_count // per_worker, 2)]
            else:
                take, total = [], 0
                for member in members:
                    take.append(member)
                    total += member[0]
                    if total >= req.vram and len(take) >= 2:
                        break
            offered = sum(m[0] for m in take)
            lacks = [why for m in take for why in m[2]]
            if len(take) < 2 or (req.gpu_count is not None and len(take) * per_worker < req.gpu_count):
                lacks.insert(0, f"only {len(members)} worker(s) with {per_worker} {product or 'GPU'} GPUs each")
            if not tp_divisible(per_worker, req):
                lacks.insert(0, f"{per_worker} GPUs per worker is not a valid tensor-parallel size")
            if offered < req.vram:
                lacks.insert(0, f"{gib(req.vram - offered)} GiB VRAM short")
            names = " + ".join(m[1] for m in take)
            text = (f"closest multi-worker combination: {names} ({len(take)} × {per_worker} {product or 'GPU'}) "
                    f"offers {gib(offered)} of {gib(req.vram)} GiB VRAM; lacks: " + "; ".join(lacks[:3] or ["nothing"]))
            share = offered / req.vram if req.vram else 1.0
            key = (share - 0.001 * len(lacks), names, text)
            if best is None or key[0] > best[0]:
                best = key
        return best[2] if best is not None else ""
