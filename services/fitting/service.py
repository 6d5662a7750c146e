"""Fitting: PlacementFiltered → PlacementFitted (or straight to scored, Unschedulable, when nothing fits)."""

from __future__ import annotations

from collections.abc import Sequence

from nats.aio.msg import Msg

from shared.bus import streams, subjects
from shared.bus.messages import ItemOutcome, PlacementFiltered, PlacementFitted, PlacementRequest, PlacementScored
from shared.bus.service import PlacementService
from shared.catalog import load_model_arch
from shared.core.catalog.models import ModelArch
from shared.core.placement import requirements, run_fitting
from shared.core.placement.domain import FitResult, ModelSpec, Reason, ResourceRequest, Unschedulable


class FittingService(PlacementService):
    """Runs the profile's fit strategies on the in-memory snapshot (claims included)."""

    name = "fitting"

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._arch: dict[str, ModelArch | None] = {}
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def consumers(self) -> Sequence[tuple[str, str, str]]:
        """Reads filter results."""
        return ((streams.STREAM_PIPE, streams.CONSUMER_FITTING, subjects.PLACEMENT_FILTERED),)

    def register(self) -> None:
        """Batched pull subscriber on placement.filtered."""

        async def on_filtered(raws: list[Msg]) -> None:
            await self.consume(raws, PlacementFiltered, subjects.PLACEMENT_FILTERED, self.handle)

        self.pull(streams.STREAM_PIPE, streams.CONSUMER_FITTING, subjects.PLACEMENT_FILTERED, on_filtered)

    async def handle(self, batch: Sequence[PlacementFiltered]) -> None:
        """Fit every model of every message; publish candidates, or the verdict when nothing fits."""
        out = []
        for msg in batch:
            fitted, failed = self.fit(msg)
            if fitted is not None:
                out.append((subjects.PLACEMENT_FITTED, fitted, f"fit:{msg.request.batch_id}"))
            if failed is not None:
                out.append((subjects.PLACEMENT_SCORED, failed, f"fit-none:{msg.request.batch_id}"))
        await self.bus.publish_js_many(out)

    def arch(self, spec: ModelSpec) -> ModelArch | None:
        """The catalogue architecture of a model, if the catalogue knows it (cached)."""
        key = spec.catalog_model or spec.name
        if key not in self._arch:
            try:
                self._arch[key] = load_model_arch(key)
            except Exception:  # not in the catalogue: the estimate then needs weight_bytes or a claim
                self._arch[key] = None
        return self._arch[key]

    def fit(self, msg: PlacementFiltered) -> tuple[PlacementFitted | None, PlacementScored | None]:
        """Pure step over the snapshot: (candidates message, unschedulable outcomes)."""
        req = msg.request
        results: dict[str, FitResult] = {}
        verdicts: dict[str, Unschedulable] = {}
        for model, spec in sorted(req.specs.items()):
            flt = msg.filtered.get(model)
            if flt is None:
                verdicts[model] = Unschedulable(model=model, message="no filter result for this model")
                continue
            request = requirements(spec, self.arch(spec))
            if isinstance(request, Reason):
                verdicts[model] = Unschedulable(model=model, message=request.message, reasons=(request,))
                continue
            assert isinstance(request, ResourceRequest)
            res = run_fitting(self.snapshot, spec, request, flt.survivors, self.profile)
            if res.candidates:
                results[model] = res
            else:
                verdicts[model] = Unschedulable(
                    model=model, message=res.message or "no candidate fits", filters=flt.reports, reasons=res.reasons
                )
        kept = tuple(i for i in req.items if i.model in results)
        fitted = None
        if kept:
            sub = PlacementRequest(
                batch_id=req.batch_id, items=kept, specs={m: s for m, s in req.specs.items() if m in results}
            )
            fitted = PlacementFitted(request=sub, fitted=results)
        failed = tuple(ItemOutcome(item=i, unschedulable=verdicts[i.model]) for i in req.items if i.model in verdicts)
        return fitted, (PlacementScored(batch_id=req.batch_id, outcomes=failed) if failed else None)
