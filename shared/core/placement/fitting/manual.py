"""manual: explicitly selected GPUs, partitioned between replicas; single replicas may overcommit."""

from __future__ import annotations

from collections.abc import Sequence

from shared.core.placement.context import PlacementContext
from shared.core.placement.domain import Candidate
from shared.core.placement.fitting.base import (
    FitOutcome,
    FitStrategy,
    by_allocatable,
    candidate,
    host_short,
    subordinate,
)
from shared.core.placement.requirements import ceil_div, gib
from shared.core.placement.snapshot import GpuView, WorkerView

Option = list[tuple[WorkerView, list[GpuView]]]


class Manual(FitStrategy):
    """With GPU ids given, the only strategy: options over the free selected GPUs, fitting ones first."""

    name = "manual"

    def skip(self, ctx: PlacementContext) -> str | None:
        """Only when GPU ids are selected."""
        return None if ctx.selected_ids else "no GPUs were selected"

    def _free(self, ctx: PlacementContext, workers: Sequence[WorkerView], notes: list[str]) -> Option:
        """Selected GPUs still usable by a new replica, grouped by worker in selection order."""
        views = {v.name: v for v in workers}
        held = ctx.snapshot.model_gpus(ctx.model.name)
        picked: dict[str, list[GpuView]] = {}
        for name, index in ctx.selected_ids:
            view = views.get(name)
            gpu = next((g for g in view.gpus if g.index == index), None) if view else None
            if view is None or gpu is None:
                continue
            if (name, index) in held:
                notes.append(f"{name}:{index} already holds a replica of this model")
            elif not gpu.schedulable:
                notes.append(f"{name}:{index} is cordoned")
            else:
                picked.setdefault(name, []).append(gpu)
        return [(views[n], gpus) for n, gpus in picked.items()]

    def _options(self, ctx: PlacementContext, free: Option, count: int) -> tuple[list[Option], list[Option]]:
        """(single-worker options, spanning options) of ``count`` GPUs of one type each."""
        single: list[Option] = []
        spanning: list[Option] = []
        by_type: dict[tuple[str, str], list[tuple[WorkerView, list[GpuView]]]] = {}
        for view, gpus in free:
            for gpu in gpus:
                entries = by_type.setdefault(gpu.type_key, [])
                if not entries or entries[-1][0].name != view.name:
                    entries.append((view, []))
                entries[-1][1].append(gpu)
        for key in sorted(by_type):
            entries = by_type[key]
            if count == 1:
                single += [[(view, [gpu])] for view, gpus in entries for gpu in gpus]
                continue
            single += [[(view, by_allocatable(gpus)[:count])] for view, gpus in entries if len(gpus) >= count]
            span: Option = []
            need = count
            for view, gpus in sorted(entries, key=lambda e: (-len(e[1]), e[0].name)):
                take = by_allocatable(gpus)[:need]
                span.append((view, take))
                need -= len(take)
                if need == 0:
                    spanning.append(span)
                    break
        return single, spanning

    def _claims(self, ctx: PlacementContext, option: Option, count: int) -> list[tuple[int, ...]]:
        share = ceil_div(ctx.req.vram, count)
        if ctx.req.gpu_memory_utilization > 0:
            return [tuple(ctx.full_claim(g) for g in gpus) for _, gpus in option]
        return [tuple(share for _ in gpus) for _, gpus in option]

    def _fits(self, ctx: PlacementContext, option: Option, claims: list[tuple[int, ...]]) -> bool:
        if sum(map(sum, claims)) < ctx.req.vram:
            return False
        for (view, gpus), cs in zip(option, claims, strict=True):
            if host_short(ctx, view, ctx.req.ram):
                return False
            if any(g.allocatable < c for g, c in zip(gpus, cs, strict=True)):
                return False
        return True

    def _candidate(self, ctx: PlacementContext, option: Option, claims: list[tuple[int, ...]],
                   overcommit: str | None) -> Candidate:
        (main, gpus), rest = option[0], option[1:]
        req = ctx.req
        subs = tuple(subordinate(v.name, g, c, req.ram, req.cpu) for (v, g), c in zip(rest, claims[1:], strict=True))
        return candidate(main.name, gpus, claims[0], req.ram, self.name, subordinates=subs, overcommit=overcommit,
                         cpu=req.cpu)

    def fit(self, ctx: PlacementContext, workers: Sequence[WorkerView]) -> FitOutcome:
        """Fitting options become candidates; if none fits, a single-replica model overcommits the best."""
        out = FitOutcome()
        count = ctx.req.gpu_count or 1
        free = self._free(ctx, workers, out.notes)
        single, spanning = self._options(ctx, free, count)
        for options in (single, spanning):
            for option in options:
                claims = self._claims(ctx, option, count)
                if self._fits(ctx, option, claims):
                    out.candidates.append(self._candidate(ctx, option, claims, None))
            if out.candidates:
                return out
        options = single + spanning
        if not options:
            out.notes.append(f"{sum(len(g) for _, g in free)} free selected GPUs; each replica needs {count}")
            return out
        if ctx.model.replicas != 1:
            out.notes.append("no selected GPU set fits and multi-replica models never overcommit")
            return out

        def room(option: Option) -> tuple[int, str, tuple[int, ...]]:
            total = sum(g.allocatable for _, gpus in option for g in gpus)
            return (-total, option[0][0].name, tuple(g.index for g in option[0][1]))

        best = min(options, key=room)
        claims = self._claims(ctx, best, count)
        offered = sum(g.allocatable for _, gpus in best for g in gpus)
        why = (
            f"manual selection overcommits: needs {gib(ctx.req.vram)} GiB VRAM, claims {gib(sum(map(sum, claims)))} "
            f"GiB on GPUs with {gib(offered)} GiB allocatable"
        )
        out.candidates.append(self._candidate(ctx, best, claims, why))
        return out
