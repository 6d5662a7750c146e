"""Fitting: PlacementFiltered → PlacementFitted (or straight to scored, Unschedulable, when nothing fits)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import msgspec
from nats.aio.msg import Msg

from shared.bus import streams, subjects
from shared.bus.columns import CandidateSet, fit_columns
from shared.bus.messages import (
    ItemOutcome,
    Message,
    PlacementFiltered,
    PlacementFitted,
    PlacementRequest,
    PlacementScored,
)
from shared.bus.names import NameLists
from shared.catalog import resolve_arch
from shared.core.catalog.models import ModelArch
from shared.core.placement import lru, requirements, run_fitting
from shared.core.placement.domain import FitResult, ModelSpec, Reason, ResourceRequest, Unschedulable
from shared.host.contract import Consumes, Emits
from shared.host.feed import Feed
from shared.host.isolation import failure_reason
from shared.host.service import PlacementService

FITTED_WORKERS_PER_MESSAGE = 16_384
SHAPES_KEPT = 1024  # distinct model shapes remembered (a bound, not a working-set estimate)

log = logging.getLogger("gantry.fitting")


class FittingService(PlacementService):
    """Runs the profile's fit strategies on the in-memory snapshot (claims included)."""

    name = "fitting"
    consumes = (
        Consumes(subjects.PLACEMENT_FILTERED, PlacementFiltered, "filter survivors per model",
                 stream=streams.STREAM_FILTERED, durable=streams.CONSUMER_FITTING),
    )
    emits = (
        Emits(subjects.PLACEMENT_FITTED, PlacementFitted, "candidate placements per model (single-GPU ones as "
              "columns)", jetstream=True),
        Emits(subjects.PLACEMENT_SCORED, PlacementScored, "replicas nothing fits: unschedulable, with why",
              jetstream=True),
    )

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._arch: dict[tuple[str | None, str, str], ModelArch | None] = {}
        # (spec, survivors) -> (when, result). Candidates are a superset check, not a verdict: scoring
        # re-checks each against its live snapshot and the ledger's compare-and-set has the last word,
        # so reusing them for a fraction of a second only costs candidates that appeared meanwhile.
        # Keyed by the survivor list's identity (lists arrive canonical, see ``NameLists``), which the entry
        # holds on to: hashing a cluster-sized tuple of names on every lookup cost more than the fit it saved.
        self._fits: dict[tuple[bytes, int], tuple[tuple[str, ...], float, FitResult | CandidateSet]] = {}
        # What a spec asks for and the fit key it makes, by ``shape_key``: the estimate reparses the backend
        # parameters and redoes the arithmetic for every model of every message otherwise.
        self._shapes: dict[str, Any] = {}  # the "shapes" store (lru): shape_key -> (request, fit key)
        self.names = NameLists()
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # resources freed or a worker joined: a "nothing fits" kept from before would answer the retry that very
        # change triggers (its figures out of date), and the replica then waited its 1-8 s pending backoff
        self.feed.listeners.append(self._forget_fits)

    def _forget_fits(self, _why: str) -> None:
        self._fits.clear()

    def feeds(self) -> Feed:
        """Claims decide what fits; file readiness and start-up progress do not."""
        return Feed.CLAIMS

    def consumers(self) -> Sequence[tuple[str, str, str]]:
        """Reads filter results."""
        return ((streams.STREAM_FILTERED, streams.CONSUMER_FITTING, subjects.PLACEMENT_FILTERED),)

    def register(self) -> None:
        """Batched pull subscriber on placement.filtered."""

        async def on_filtered(raws: list[Msg]) -> None:
            await self.consume(raws, PlacementFiltered, subjects.PLACEMENT_FILTERED, self.handle)

        self.pull(streams.STREAM_FILTERED, streams.CONSUMER_FITTING, subjects.PLACEMENT_FILTERED, on_filtered)

    async def handle(self, batch: Sequence[PlacementFiltered]) -> None:
        """Fit every model of every message; publish candidates, or the verdict when nothing fits."""
        out: list[tuple[str, Message, str]] = []
        for msg in batch:
            fitted, failed = self.fit(msg)
            for one in fitted:
                out.append((subjects.PLACEMENT_FITTED, one, f"fit:{one.request.batch_id}"))
            if failed is not None:
                out.append((subjects.PLACEMENT_SCORED, failed, f"fit-none:{msg.request.batch_id}"))
        await self.bus.publish_js_many(out)

    def arch(self, spec: ModelSpec) -> ModelArch | None:
        """The catalogue architecture of a model by ``catalog_model``, name or ``source`` (HF id), if the
        catalogue knows one (cached); without it the estimate needs weight_bytes or a claim."""
        key = (spec.catalog_model, spec.name, spec.source)
        if key not in self._arch:
            self._arch[key] = resolve_arch(spec)
        return self._arch[key]

    def requirements(self, spec: ModelSpec) -> tuple[ResourceRequest | Reason, bytes]:
        """The core's resource request for ``spec`` (or why there is none) and its ``fit_key``, remembered per
        ``shape_key``: models of one shape, and the same model from message to message, ask the same."""
        key = shape_key(spec)
        hit: tuple[ResourceRequest | Reason, bytes] | None = lru.used(self._shapes, "shapes", key)
        if hit is None:
            request = requirements(spec, self.arch(spec))
            hit = (request, fit_key(spec, request) if isinstance(request, ResourceRequest) else b"")
            lru.keep(self._shapes, "shapes", key, hit, SHAPES_KEPT)
        return hit

    def fit_model(
        self, spec: ModelSpec, request: ResourceRequest, survivors: tuple[str, ...], shape: bytes | None = None
    ) -> FitResult | CandidateSet:
        """The core's fitting for one model (columns when single-GPU), reused for ``fit_cache_s``; ``shape``
        is ``fit_key(spec, request)`` when the caller has it already."""
        ttl = self.settings.fit_cache_s
        if ttl <= 0:
            return self._fit_now(spec, request, survivors)
        now = self.clock()
        key = (shape if shape is not None else fit_key(spec, request), id(survivors))
        hit = self._fits.get(key)
        if (
            hit is not None and hit[0] is survivors and now - hit[1] < ttl
            and (shared := _shared(hit[2], spec.name)) is not None
        ):
            return shared
        res = self._fit_now(spec, request, survivors)
        if len(self._fits) > 256:
            self._fits = {k: v for k, v in self._fits.items() if now - v[1] < ttl}
        self._fits[key] = (survivors, now, res)
        return res

    def _fit_now(
        self, spec: ModelSpec, request: ResourceRequest, survivors: tuple[str, ...]
    ) -> FitResult | CandidateSet:
        cols = fit_columns(self.snapshot, spec, request, survivors, self.profile)
        if cols is not None:
            return cols
        return run_fitting(self.snapshot, spec, request, survivors, self.profile)

    def fit(self, msg: PlacementFiltered) -> tuple[list[PlacementFitted], PlacementScored | None]:
        """Pure step over the snapshot: (candidate messages, unschedulable outcomes)."""
        msg = msgspec.structs.replace(msg, survivor_sets=self.names.all(msg.survivor_sets))
        req = msg.request
        results: dict[str, FitResult] = {}
        columns: dict[str, CandidateSet] = {}
        verdicts: dict[str, Unschedulable] = {}
        for model, spec in sorted(req.specs.items()):
            flt = msg.result(model)
            if flt is None:
                verdicts[model] = Unschedulable(model=model, message="no filter result for this model")
                continue
            request, shape = self.requirements(spec)
            if isinstance(request, Reason):
                verdicts[model] = Unschedulable(model=model, message=request.message, reasons=(request,))
                continue
            try:
                res = self.fit_model(spec, request, flt.survivors, shape)
            except Exception as exc:  # a spec the core cannot fit must not take the other models of the message along
                log.exception("fitting %s failed", model)
                verdicts[model] = Unschedulable(model=model, message=f"fitting failed: {failure_reason(exc)}")
                continue
            if isinstance(res, CandidateSet):
                columns[model] = res
                results[model] = FitResult(model=model, strategy=res.strategy)
            elif res.candidates:
                results[model] = res
            else:
                verdicts[model] = Unschedulable.of(model, res.message or "no candidate fits", filters=flt.reports,
                                                   reasons=res.reasons)
        failed = tuple(ItemOutcome(item=i, unschedulable=verdicts[i.model]) for i in req.items if i.model in verdicts)
        scored = PlacementScored(batch_id=req.batch_id, outcomes=failed) if failed else None
        return self.pack(req, results, columns), scored

    def pack(
        self, req: PlacementRequest, results: dict[str, FitResult], columns: dict[str, CandidateSet]
    ) -> list[PlacementFitted]:
        """Group models into messages of at most ``FITTED_WORKERS_PER_MESSAGE`` candidate workers.

        A candidate set is cluster-sized (1,000 workers: ~20 kB), and NATS messages are bounded; one
        message per model would cost one JetStream round trip per model instead.
        """
        groups: list[list[str]] = []
        size = FITTED_WORKERS_PER_MESSAGE
        for model in sorted(results):
            weight = len(columns[model].workers) if model in columns else len(results[model].candidates)
            if size + weight > FITTED_WORKERS_PER_MESSAGE:
                groups.append([])
                size = 0
            groups[-1].append(model)
            size += weight
        out = []
        for models in groups:
            # Named by content: a redelivered request may group models differently (candidates changed),
            # and a reused id would make JetStream drop a group it never saw as a duplicate.
            group = hashlib.blake2b(",".join(models).encode(), digest_size=6).hexdigest()
            sub = PlacementRequest(
                batch_id=f"{req.batch_id}:{group}",
                items=tuple(i for i in req.items if i.model in models),
                specs={m: req.specs[m] for m in models},
            )
            out.append(PlacementFitted.of(
                sub, {m: results[m] for m in models}, {m: columns[m] for m in models if m in columns}
            ))
        return out


def shape_key(spec: ModelSpec) -> bytes:
    """All a spec's resource request and ``fit_key`` depend on: the spec whole, but for the replica count
    beyond what either reads of it (the estimate reads it only to split a manual GPU selection among
    replicas; ``fit_key`` only as one-or-several). Scale commands change nothing else."""
    replicas = spec.replicas if spec.gpu_selector is not None else min(spec.replicas, 2)
    return msgspec.json.encode(msgspec.structs.replace(spec, replicas=replicas))


def fit_key(spec: ModelSpec, request: ResourceRequest) -> bytes:
    """What fitting's result depends on: the resource request and the spec without what fitting never reads.

    Models of one shape (same request, backend, selectors, offloading) share candidates, whatever their names
    and sources: the name is read only to find a manual placement's own GPUs (kept then), the source only
    through the request (its size, GGUF layers). Each scale command changes the replica count, which fitting
    only reads as one-or-several (manual placement may overcommit a lone replica).
    """
    manual = spec.gpu_selector is not None
    shape = msgspec.structs.replace(
        spec, name=spec.name if manual else "", source="", replicas=min(spec.replicas, 2), catalog_model=None,
    )
    return msgspec.json.encode((shape, request))


def _shared(res: FitResult | CandidateSet, model: str) -> FitResult | CandidateSet | None:
    """Another model's fitting result as ``model``'s own; None for an explanation of why nothing fits (its
    words may name the model it was written for)."""
    if res.model == model:
        return res
    if isinstance(res, FitResult) and not res.candidates:
        return None
    return msgspec.structs.replace(res, model=model)
