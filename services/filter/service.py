"""Filter: PlacementRequest → PlacementFiltered (or straight to scored, Unschedulable, when none survive)."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
from nats.aio.msg import Msg

from shared.bus import streams, subjects
from shared.bus.messages import ItemOutcome, Message, PlacementFiltered, PlacementRequest, PlacementScored
from shared.core.placement import filter_rows
from shared.core.placement.domain import FilterReport, FilterResult, ModelSpec, Unschedulable
from shared.core.placement.explain import filters_message
from shared.core.placement.filters.local_path import is_local_path
from shared.core.placement.snapshot import BoolArray
from shared.host.contract import Consumes, Emits
from shared.host.feed import Feed
from shared.host.service import PlacementService


class FilterService(PlacementService):
    """Runs the profile's filter chain on the in-memory snapshot."""

    name = "filter"
    consumes = (
        Consumes(subjects.PLACEMENT_REQUESTED, PlacementRequest, "replicas to place, with their models' specs",
                 stream=streams.STREAM_REQUESTED, durable=streams.CONSUMER_FILTER),
    )
    emits = (
        Emits(subjects.PLACEMENT_FILTERED, PlacementFiltered, "the workers that passed every filter, per model",
              jetstream=True),
        Emits(subjects.PLACEMENT_SCORED, PlacementScored, "replicas no worker passes: unschedulable, with why",
              jetstream=True),
    )

    def consumers(self) -> Sequence[tuple[str, str, str]]:
        """Reads placement requests."""
        return ((streams.STREAM_REQUESTED, streams.CONSUMER_FILTER, subjects.PLACEMENT_REQUESTED),)

    def feeds(self) -> Feed:
        """Filters look at workers only."""
        return Feed.WORKERS_ONLY

    def register(self) -> None:
        """Batched pull subscriber on placement.requested."""

        async def on_requested(raws: list[Msg]) -> None:
            await self.consume(raws, PlacementRequest, subjects.PLACEMENT_REQUESTED, self.handle)

        self.pull(streams.STREAM_REQUESTED, streams.CONSUMER_FILTER, subjects.PLACEMENT_REQUESTED, on_requested)

    async def handle(self, batch: Sequence[PlacementRequest]) -> None:
        """Filter every model of every request; publish survivors, or the verdict when none survive."""
        out: list[tuple[str, Message, str]] = []
        for req in batch:
            passed, failed = self.filter_request(req)
            if passed is not None:
                out.append((subjects.PLACEMENT_FILTERED, passed, f"flt:{req.batch_id}"))
            if failed is not None:
                out.append((subjects.PLACEMENT_SCORED, failed, f"flt-none:{req.batch_id}"))
        await self.bus.publish_js_many(out)

    def filter_request(self, req: PlacementRequest) -> tuple[PlacementFiltered | None, PlacementScored | None]:
        """Pure step over the snapshot: (survivors message, unschedulable outcomes)."""
        now = self.clock()
        results: dict[str, FilterResult] = {}
        # Models of one request mostly keep the same workers: each distinct survivor mask is named once (a
        # cluster-sized tuple), and the models sharing it share that tuple.
        named: dict[bytes, tuple[str, ...]] = {}
        # Models of one shape get one verdict: the snapshot and the clock stand still for the whole request.
        shaped: dict[bytes, tuple[BoolArray, tuple[FilterReport, ...]]] = {}
        for model, spec in sorted(req.specs.items()):
            shape = filter_key(spec)
            hit = shaped.get(shape)
            if hit is None:
                hit = shaped[shape] = filter_rows(self.snapshot, spec, now, self.profile)
            mask, reports = hit
            key = mask.tobytes()
            survivors = named.get(key)
            if survivors is None:
                survivors = named[key] = tuple(self.snapshot.names_where(mask))
            results[model] = FilterResult(model=spec.name, survivors=survivors, reports=reports)
        ok = {m: r for m, r in results.items() if r.survivors}
        kept = tuple(i for i in req.items if i.model in ok)
        failed = []
        for item in req.items:
            res = results.get(item.model)
            if res is None:
                un = Unschedulable(model=item.model, message=f"no spec for model {item.model!r} in the request")
            elif res.survivors:
                continue
            else:
                un = Unschedulable.of(item.model, filters_message(res.reports), filters=res.reports)
            failed.append(ItemOutcome(item=item, unschedulable=un))
        passed = None
        if kept:
            sub = PlacementRequest(
                batch_id=req.batch_id, items=kept, specs={m: s for m, s in req.specs.items() if m in ok}
            )
            passed = PlacementFiltered.of(sub, ok)
        scored = PlacementScored(batch_id=req.batch_id, outcomes=tuple(failed)) if failed else None
        return passed, scored


def filter_key(spec: ModelSpec) -> bytes:
    """What a filter verdict depends on in a spec: all of it but the name, the replica count and a source that
    is not a local path. No filter reads a model's name or replica count, and only the local-path filter reads
    its source (tests/unit/services/test_filter_key.py holds every registered filter to this)."""
    source = spec.source if is_local_path(spec.source) else ""
    return msgspec.json.encode(msgspec.structs.replace(spec, name="", replicas=0, source=source))
