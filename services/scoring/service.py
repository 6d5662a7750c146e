"""Scoring: PlacementFitted → PlacementScored, one decision per replica.

Replicas of a batch are scored one after another; each choice is *assumed* into this replica's snapshot
(its claims and counts) before the next is scored, so a burst spreads instead of piling onto the one best
GPU. Assumptions are replaced by the real record when the reconciler's instance event arrives, dropped
when the commit is refused (a PENDING event), and expire after a while if neither comes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from nats.aio.msg import Msg

from shared.bus import streams, subjects
from shared.bus.columns import CandidateSet, as_candidates, locate, score_columns
from shared.bus.messages import ItemOutcome, PlacementFitted, PlacementScored
from shared.bus.names import NameLists
from shared.core.placement import instance_from_decision, lru, run_scoring
from shared.core.placement.domain import Candidate, Decision, Instance, ModelSpec, Unschedulable
from shared.core.placement.fastpath import Positions
from shared.core.placement.reconcile import still_fits
from shared.host.contract import Consumes, Emits
from shared.host.feed import Feed
from shared.host.service import PlacementService

ASSUME_TTL_S = 10.0


LOCATED_KEPT = 256  # candidate sets whose positions are remembered (evicting the least recently used)


class ScoringService(PlacementService):
    """Runs the profile's scorers and picks one candidate per replica."""

    name = "scoring"
    consumes = (
        Consumes(subjects.PLACEMENT_FITTED, PlacementFitted, "candidate placements per model",
                 stream=streams.STREAM_FITTED, durable=streams.CONSUMER_SCORING),
    )
    emits = (
        Emits(subjects.PLACEMENT_SCORED, PlacementScored, "one decision (or why none) per replica, to commit",
              jetstream=True),
    )

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._located: dict[str, Any] = {}  # the "located" store (lru): candidate set -> (workers, positions)
        self._located_layout = -1
        self.names = NameLists()
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def feeds(self) -> Feed:
        """Claims and counts (spread, binpack) and file readiness (locality); not start-up progress."""
        return Feed.CLAIMS | Feed.FILES

    def consumers(self) -> Sequence[tuple[str, str, str]]:
        """Reads fitting results."""
        return ((streams.STREAM_FITTED, streams.CONSUMER_SCORING, subjects.PLACEMENT_FITTED),)

    def register(self) -> None:
        """Batched pull subscriber on placement.fitted."""

        async def on_fitted(raws: list[Msg]) -> None:
            await self.consume(raws, PlacementFitted, subjects.PLACEMENT_FITTED, self.handle)

        self.pull(streams.STREAM_FITTED, streams.CONSUMER_SCORING, subjects.PLACEMENT_FITTED, on_fitted)

    async def handle(self, batch: Sequence[PlacementFitted]) -> None:
        """Score every item; publish the outcomes for the reconciler to commit."""
        self.expire_assumptions()
        out = [
            (subjects.PLACEMENT_SCORED, self.score(msg), f"score:{msg.request.batch_id}") for msg in batch
        ]
        await self.bus.publish_js_many(out)

    def score(self, msg: PlacementFitted) -> PlacementScored:
        """Pure step over the snapshot (plus this replica's assumptions)."""
        msg = msgspec.structs.replace(msg, worker_sets=self.names.all(msg.worker_sets))
        req = msg.request
        now = self.clock()
        outcomes = []
        # Per model, once for all its items: its candidate set and where they are in this snapshot.
        located: dict[str, tuple[CandidateSet | None, Positions | None]] = {}
        for item in req.items:
            spec = req.specs[item.model]
            # scored again (a redelivery, or its batch handed back one message at a time after a poison one): its
            # own earlier guess must not count against it ("all candidates were taken" for a replica with room)
            self.feed.forget_assumption(item.instance_id)
            decision: Decision | None = None
            considered = 0
            if item.model not in located:
                found = msg.candidate_set(item.model)
                located[item.model] = (found, None) if found is None else (found, self.locate(found))
            cset, pos = located[item.model]
            if cset is not None:
                if pos is not None:
                    decision = score_columns(self.snapshot, spec, cset, pos, self.profile)
                if decision is None:  # a worker unknown here, or a scorer without a fast form
                    decision = self._reference(spec, as_candidates(cset))
                considered = len(cset) if decision is None else 0  # counted for the explanation only
            else:
                candidates = msg.fitted[item.model].candidates
                considered = len(candidates)
                decision = self._reference(spec, candidates)
            if decision is None:
                un = Unschedulable(
                    model=item.model,
                    message=f"all {considered} candidates were taken while this replica was in flight",
                )
                outcomes.append(ItemOutcome(item=item, unschedulable=un, retry=True))
                continue
            self.assume(instance_from_decision(decision, item.instance_id, created_at=item.requested_at), now)
            outcomes.append(ItemOutcome(item=item, decision=decision))
        return PlacementScored(batch_id=req.batch_id, outcomes=tuple(outcomes), specs=req.specs)

    def locate(self, cset: CandidateSet) -> Positions | None:
        """The candidates' positions in this snapshot, remembered while its rows stay put.

        Consecutive messages carry the same candidate sets (fitting reuses its results briefly, and models
        of one shape share them), and locating 8,000 GPUs costs more than scoring them.
        """
        if self._located_layout != self.snapshot.layout:  # rows moved: every remembered position is stale
            self._located.clear()
            self._located_layout = self.snapshot.layout
        # The worker list by identity (``self.names`` hands out one tuple per distinct list; hashing a thousand
        # names per decision cost more than the lookup), held in the entry so that its id cannot be reused.
        key = (id(cset.workers), cset.gpus, cset.claims, cset.claim)
        hit: tuple[tuple[str, ...], Positions | None] | None = lru.used(self._located, "located", key)
        if hit is None or hit[0] is not cset.workers:
            hit = (cset.workers, locate(self.snapshot, cset))
            lru.keep(self._located, "located", key, hit, LOCATED_KEPT)
        return hit[1]

    def _reference(self, spec: ModelSpec, candidates: Sequence[Candidate]) -> Decision | None:
        live = [c for c in candidates if still_fits(self.snapshot, c)]
        return run_scoring(self.snapshot, spec, live, self.profile) if live else None

    def assume(self, instance: Instance, now: float) -> None:
        """Count a decided (not yet committed) replica in the snapshot."""
        known = self.feed.instances.get(instance.id)
        if known is not None and known.worker is not None:
            return  # already committed (a redelivery): the real record is there
        self.feed.assume(instance, now)

    def expire_assumptions(self) -> None:
        """Drop assumptions whose commit never showed up."""
        self.feed.expire_assumptions(self.clock(), ASSUME_TTL_S)
