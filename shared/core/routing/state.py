"""The pool as the router sees it: endpoints from placement, their latest metrics, the router's own
in-flight accounting and the two prefix indexes. Updated from events (metrics, KV events, dispatches,
first tokens, finishes); never scraped per request. Pure: every time is passed in.

In-flight accounting follows llm-d's ``inflight-load-producer`` and Dynamo's active blocks: a request's
uncached prompt tokens count on its endpoint from dispatch to its first token (prefill done), the request
itself until it finishes. It is what keeps a burst from piling onto the endpoint whose 50 ms-old metrics
look idlest (llm-d-router #298, #1599). Every update is idempotent per request id.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from shared.core.engine.step_time import StepTimeModel
from shared.core.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from shared.core.routing.domain import (
    BROKEN_STREAK,
    FAILED_HOLD_S,
    Endpoint,
    EndpointMetrics,
    EndpointState,
    PoolColumns,
)
from shared.core.routing.hashing import ChunkMemo
from shared.core.routing.prefix_index import DEFAULT_CAPACITY, PrefixIndex

DEFAULT_PREFILL_TOKENS_PER_S = 15_928.0  # llm-d peakPrefillThroughput default (Qwen-32B on H100)
OUTCOMES_KEPT = 4096
"""Failure news held for the caller to share (``PoolState.share_outcomes``); past it the oldest go: a caller that
stopped draining cannot make the core hold memory without bound, and its peers only learn a few failures late."""


@dataclass(frozen=True, slots=True)
class DataConfig:
    """Settings of the data layer (shared by every profile of a router)."""

    block_size: int = 16  # must equal the engines' block size for the precise index to match
    max_prefix_blocks: int = 8192  # cap on blocks hashed and indexed per request (131k tokens at 16)
    approx_capacity: int = DEFAULT_CAPACITY  # approximate index: blocks remembered per endpoint (LRU)
    # speculative index (the "hybrid" source's stand-in for KV events not yet arrived): only the most recent
    # decisions' blocks per endpoint (llm-d's speculativeIndexing keeps them 2 s; here: a small LRU)
    speculative_capacity: int = 8192
    precise_slack: float = 1.25  # precise index: engine's num_gpu_blocks × this (guards lost removes)
    staleness_s: float = 0.2  # metrics older than this count as stale (GIE saturation detector)
    # prompt chunks (32 blocks) whose hashes are remembered for prompts that repeat them (0: off); see
    # ``hashing.ChunkMemo``: 2,048 chunks of 16-token blocks are about 1M tokens, some 40 MB at most
    hash_memo_chunks: int = 2048

    def problems(self) -> list[str]:
        """Every invalid setting, as sentences."""
        out = []
        if self.block_size < 1:
            out.append(f"block_size must be >= 1 (got {self.block_size})")
        if self.max_prefix_blocks < 1:
            out.append(f"max_prefix_blocks must be >= 1 (got {self.max_prefix_blocks})")
        if self.approx_capacity < 1:
            out.append(f"approx_capacity must be >= 1 (got {self.approx_capacity})")
        if self.speculative_capacity < 1:
            out.append(f"speculative_capacity must be >= 1 (got {self.speculative_capacity})")
        if self.precise_slack < 1:
            out.append(f"precise_slack must be >= 1 (got {self.precise_slack})")
        if self.hash_memo_chunks < 0:
            out.append(f"hash_memo_chunks must be >= 0 (got {self.hash_memo_chunks})")
        if not self.staleness_s > 0:
            out.append(f"staleness_s must be > 0 (got {self.staleness_s})")
        return out


class _Flight:
    __slots__ = ("endpoint", "prefilled", "since", "tokens")

    def __init__(self, endpoint: str, tokens: int, since: float) -> None:
        self.endpoint = endpoint
        self.tokens = tokens
        self.prefilled = False
        self.since = since  # when it was dispatched (flights are held in dispatch order)


class PoolState:
    """Endpoints, metrics, in-flight load and prefix indexes of every model a router serves."""

    def __init__(self, config: DataConfig | None = None) -> None:
        self.config = config or DataConfig()
        problems = self.config.problems()
        if problems:
            raise ValueError("data layer: " + "; ".join(problems))
        self.endpoints: dict[str, EndpointState] = {}
        self.by_model: dict[str, list[EndpointState]] = {}
        self.approx = PrefixIndex(self.config.approx_capacity)
        self.speculative = PrefixIndex(self.config.speculative_capacity)
        self.track_approx = True  # which assumed-state indexes decisions feed (the router sets them from its plugins)
        self.track_speculative = True
        self.hybrid_fallback = False  # hybrid matches fall back on the approximate index (see ``Cycle.matches``)
        self.precise = PrefixIndex(1 << 62)
        self.chunk_memo = ChunkMemo(self.config.hash_memo_chunks) if self.config.hash_memo_chunks else None
        self.either = self.speculative.mirror(self.precise)  # hybrid matches: one lookup per block
        self.step_models: dict[str, StepTimeModel] = {}
        self._prefill_rate: dict[str, float] = {}
        self._flights: dict[str, _Flight] = {}
        self.streaking: set[str] = set()  # endpoints whose last BROKEN_STREAK requests here failed
        # (endpoint id, failed) for each failure here and each first success after one, for peers (None: not shared)
        self.outcomes: deque[tuple[str, bool]] | None = None
        self._notify: Callable[[], None] | None = None
        self._cleared: dict[str, float] = {}  # endpoint -> when a success last cleared its failures (peers' digests)
        self._newest_flight = -math.inf  # the latest dispatch stamp: the flights' stamps never decrease in order
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._masks: dict[str, int] = {}
        self._columns: dict[str, PoolColumns] = {}  # built on demand, dropped when a pool's membership changes

    # -- endpoints ------------------------------------------------------------------------------------
    def upsert(self, endpoint: Endpoint, step_model: StepTimeModel | None = None) -> EndpointState:
        """Add an endpoint, or replace its static description (metrics, load and cache knowledge kept)."""
        st = self.endpoints.get(endpoint.id)
        if st is not None and st.endpoint.model != endpoint.model:
            self.remove(endpoint.id)
            st = None
        if st is None:
            slot = self._free_slots.pop() if self._free_slots else self._next_slot
            if slot == self._next_slot:
                self._next_slot += 1
            st = EndpointState(endpoint, slot)
            self.endpoints[endpoint.id] = st
            self.by_model.setdefault(endpoint.model, []).append(st)
            self._masks.pop(endpoint.model, None)
            self._columns.pop(endpoint.model, None)
        else:
            st.endpoint = endpoint
        if step_model is not None:
            self.step_models[endpoint.id] = step_model
        self._prefill_rate.pop(endpoint.id, None)
        st.prefill_rate = self.prefill_rate(st)
        st.effective_rate = effective_rate(st)
        return st

    def remove(self, endpoint_id: str) -> None:
        """Forget an endpoint: its cache knowledge and in-flight requests go with it."""
        if self._forget_endpoint(endpoint_id):
            self._drop_flights({endpoint_id})

    def _drop_flights(self, gone: set[str]) -> None:
        """Forget the requests in flight on endpoints that left (one pass, however many left)."""
        for rid in [rid for rid, f in self._flights.items() if f.endpoint in gone]:
            del self._flights[rid]

    def _forget_endpoint(self, endpoint_id: str) -> bool:
        """Forget an endpoint but its flights; False if it was not known."""
        st = self.endpoints.pop(endpoint_id, None)
        self.streaking.discard(endpoint_id)
        self._cleared.pop(endpoint_id, None)
        if st is None:
            return False
        pool = self.by_model.get(st.endpoint.model, [])
        if st in pool:
            pool.remove(st)
        if not pool:
            self.by_model.pop(st.endpoint.model, None)
        self._masks.pop(st.endpoint.model, None)
        self._columns.pop(st.endpoint.model, None)
        st.attach(None)
        self.approx.clear(st.slot)
        self.speculative.clear(st.slot)
        self.precise.clear(st.slot)
        self._free_slots.append(st.slot)
        self.step_models.pop(endpoint_id, None)
        self._prefill_rate.pop(endpoint_id, None)
        return True

    def set_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        """Make the pool exactly ``endpoints`` (placement's RUNNING instances)."""
        wanted = {e.id: e for e in endpoints}
        # their flights in one pass: one pass per endpoint cost endpoints x flights (0.22 s for 200 leaving with
        # 100,000 requests in flight, picks and reports waiting)
        gone = {eid for eid in self.endpoints if eid not in wanted}
        for eid in gone:
            self._forget_endpoint(eid)
        if gone:
            self._drop_flights(gone)
        for e in wanted.values():
            cur = self.endpoints.get(e.id)
            if cur is None or cur.endpoint != e:
                self.upsert(e)

    def pool(self, model: str) -> list[EndpointState]:
        """Endpoints serving ``model`` (the base model name), in arrival order."""
        return self.by_model.get(model, [])

    def pool_mask(self, model: str) -> int:
        """Bitmask of the index slots of ``model``'s endpoints."""
        mask = self._masks.get(model)
        if mask is None:
            mask = 0
            for st in self.by_model.get(model, ()):
                mask |= 1 << st.slot
            self._masks[model] = mask
        return mask

    def columns(self, model: str) -> PoolColumns:
        """``model``'s pool load as arrays aligned with ``pool(model)`` (kept current by the endpoints)."""
        cols = self._columns.get(model)
        if cols is None:
            members = self.by_model.get(model)
            if members is None:
                return PoolColumns([])
            cols = self._columns[model] = PoolColumns(members)
        return cols

    # -- signals --------------------------------------------------------------------------------------
    def update_metrics(self, endpoint_id: str, metrics: EndpointMetrics) -> bool:
        """Record a state report; an unknown endpoint or a report older than the one held is ignored."""
        st = self.endpoints.get(endpoint_id)
        if st is None:
            return False
        if st.metrics is not None and metrics.ts < st.metrics.ts:
            return False
        st.report(metrics)
        st.effective_rate = effective_rate(st)
        return True

    def apply_kv_events(self, endpoint_id: str, batch: KVEventBatch) -> int:
        """Apply an engine's KV events to the precise index; returns the events applied (0: unknown endpoint)."""
        st = self.endpoints.get(endpoint_id)
        if st is None:
            return 0
        idx, slot = self.precise, st.slot
        blocks = st.endpoint.num_gpu_blocks  # 0 (or a nonsensical negative): not reported, the default bound
        cap = int(blocks * self.config.precise_slack) if blocks > 0 else DEFAULT_CAPACITY
        removed: list[int] = []  # engines send one BlockRemoved per evicted block: apply runs of them at once
        for ev in batch.events:
            if isinstance(ev, BlockRemoved):
                removed.extend(ev.block_hashes)
                continue
            if removed:
                idx.remove(slot, removed)
                removed = []
            if isinstance(ev, BlockStored):
                idx.add(slot, ev.block_hashes, cap)
            elif isinstance(ev, AllBlocksCleared):
                idx.clear(slot)
        if removed:
            idx.remove(slot, removed)
        return len(batch.events)

    def remember(self, endpoint_id: str, hashes: list[int]) -> None:
        """Assumed state: ``endpoint_id`` will hold ``hashes`` once it prefilled the request sent there."""
        st = self.endpoints.get(endpoint_id)
        if st is not None and hashes:
            if self.track_approx:
                self.approx.add(st.slot, hashes)
            if self.track_speculative:
                self.speculative.add(st.slot, hashes)

    # -- in-flight accounting -------------------------------------------------------------------------
    def dispatched(self, request_id: str, endpoint_id: str, uncached_tokens: int, now: float) -> None:
        """The request was sent to ``endpoint_id`` at ``now`` with this many prompt tokens to prefill there."""
        st = self.endpoints.get(endpoint_id)
        if st is None or request_id in self._flights:
            return
        tokens = max(int(uncached_tokens), 0)
        if now < self._newest_flight:
            self._clock_stepped_back(now)
        self._newest_flight = now
        self._flights[request_id] = _Flight(endpoint_id, tokens, now)
        st.inflight_requests += 1
        st.inflight_tokens += tokens

    def moved(self, request_id: str, endpoint_id: str, now: float | None = None) -> bool:
        """The request was served by ``endpoint_id`` instead (the proxy walked the fallback list): its load
        moves there, uncached tokens included. False when the request or the endpoint is unknown."""
        f = self._flights.get(request_id)
        st = self.endpoints.get(endpoint_id)
        if f is None or st is None or f.endpoint == endpoint_id:
            return False
        old = self.endpoints.get(f.endpoint)
        pending = 0 if f.prefilled else f.tokens
        if old is not None:
            old.inflight_requests -= 1
            old.inflight_tokens -= pending
            self._failed(old, now)  # the proxy gave up on it (connect failure, refused or reset)
        f.endpoint = endpoint_id
        st.inflight_requests += 1
        st.inflight_tokens += pending
        return True

    def first_token(self, request_id: str) -> None:
        """The request's first token arrived: its prefill no longer loads the endpoint."""
        f = self._flights.get(request_id)
        if f is None or f.prefilled:
            return
        f.prefilled = True
        st = self.endpoints.get(f.endpoint)
        if st is not None:
            st.inflight_tokens -= f.tokens
            self._served(st)  # it produced output: it works

    def finished(self, request_id: str, ok: bool | None = None, now: float | None = None) -> None:
        """The request ended (done, failed or cancelled); ``ok``: whether its endpoint answered it (False: an error
        answer or none; None: not known, e.g. the client left), which marks or clears the endpoint's failure, dated
        ``now`` (the caller's clock; None: the newest dispatch, the core keeping no clock of its own)."""
        f = self._flights.pop(request_id, None)
        if f is None:
            return
        st = self.endpoints.get(f.endpoint)
        if st is None:
            return
        if not f.prefilled:  # its prefill no longer loads the endpoint (not a success: a failed request had none)
            st.inflight_tokens -= f.tokens
        st.inflight_requests -= 1
        if ok is True:
            self._served(st)
        elif ok is False:
            self._failed(st, now)

    def _clock_stepped_back(self, now: float) -> None:
        """The caller's clock went back (an NTP step, a VM resumed): flights stamped after ``now`` count from ``now``,
        so the stamps stay in dispatch order and ``expire_flights`` (which stops at the first young one) reaches
        every old flight behind them. They expire at most a TTL after the step, never a step's length late."""
        for f in self._flights.values():
            if f.since > now:
                f.since = now
        for st in self.endpoints.values():  # a failure dated after ``now`` holds from ``now``, not for the step
            if st.failed_at is not None and st.failed_at > now:
                st.failed_at = now

    def expire_flights(self, before: float, keep: int) -> list[str]:
        """Count as finished every request dispatched before ``before``, and the oldest past ``keep`` in flight;
        returns their ids. For callers told of ends by messages that can be lost (core NATS delivers at most
        once) or never sent: without it such a request loads its endpoint, and holds memory, forever."""
        excess = len(self._flights) - keep
        gone: list[str] = []
        for rid, f in self._flights.items():  # dispatch order: oldest first
            if f.since >= before and len(gone) >= excess:
                break
            gone.append(rid)
        for rid in gone:
            self.finished(rid)
        return gone

    def in_flight(self) -> int:
        """Requests dispatched and not yet finished."""
        return len(self._flights)

    def share_outcomes(self, notify: Callable[[], None] | None = None) -> None:
        """From now on, keep each failure of a request here and each first success after failures in
        ``outcomes`` (for the caller to tell the other router replicas, which apply them with ``peer_outcome``);
        ``notify`` is called after each one is kept (the caller's sender then wakes, instead of polling)."""
        if self.outcomes is None:
            self.outcomes = deque(maxlen=OUTCOMES_KEPT)
        self._notify = notify

    def take_outcomes(self) -> list[tuple[str, bool]]:
        """The outcomes kept since the last call, oldest first (empty when not sharing)."""
        if not self.outcomes:
            return []
        out = list(self.outcomes)
        self.outcomes.clear()
        return out

    def peer_outcome(self, endpoint_id: str, failed: bool, now: float, sent_at: float | None = None) -> bool:
        """Another replica saw a request fail at ``endpoint_id`` (``failed``) or succeed there after failures: counted
        as if it were this router's own, so a broken engine is left out after ``BROKEN_STREAK`` failures in all, not
        that many per replica; a failure it sent (``sent_at``) before a success seen here is old news. Not kept in
        ``outcomes`` (no echo). False for an endpoint this router does not know, and for old news."""
        st = self.endpoints.get(endpoint_id)
        if st is None or (failed and sent_at is not None and sent_at <= self._cleared.get(endpoint_id, -math.inf)):
            return False
        if failed:
            self._failed(st, now, tell=False)  # dated on arrival here: a NATS hop after the failure
        else:
            self._served(st, tell=False, now=now)
        return True

    def failing_digest(self, now: float) -> list[tuple[str, int, float]]:
        """(endpoint, streak, seconds since its last failure) of every endpoint failing at ``now``: what a replica that
        started later (or missed messages) needs to leave out the engines the others leave out."""
        return [(st.id, st.fail_streak, max(now - st.failed_at, 0.0)) for st in self.endpoints.values()
                if st.failed_at is not None and st.failing(now)]

    def peer_failing(self, endpoint_id: str, streak: int, age_s: float, now: float) -> bool:
        """Another replica counts ``endpoint_id`` as failing: ``streak`` failures in a row, the last ``age_s`` ago.
        Taken where it says more than this router knows (a later start, a lost message): the longer streak, the later
        failure, dated as the peer dates it (telling never renews a hold), and never over a success seen here after
        that failure. Not kept in ``outcomes``. False when nothing changed."""
        st = self.endpoints.get(endpoint_id)
        at = now - age_s
        if st is None or streak < 1 or not age_s < FAILED_HOLD_S or at <= self._cleared.get(endpoint_id, -math.inf):
            return False
        if st.failed_at is not None and st.failing(now):
            if streak <= st.fail_streak and at <= st.failed_at:
                return False
            st.fail_streak, st.failed_at = max(st.fail_streak, streak), max(st.failed_at, at)
        else:
            st.fail_streak, st.failed_at = streak, at
        if st.fail_streak >= BROKEN_STREAK:
            self.streaking.add(st.id)
        return True

    def _failed(self, st: EndpointState, now: float | None, tell: bool = True) -> None:
        # dated by the caller's clock; else by the newest dispatch (the core keeps no clock of its own)
        st.failed(self._newest_flight if now is None else now)
        if st.fail_streak >= BROKEN_STREAK:
            self.streaking.add(st.id)
        else:  # a new streak began (the last one's hold had lapsed)
            self.streaking.discard(st.id)
        if tell and self.outcomes is not None:
            self.outcomes.append((st.id, True))
            if self._notify is not None:
                self._notify()

    def _served(self, st: EndpointState, tell: bool = True, now: float | None = None) -> None:
        if st.failed_at is None:
            return  # the usual case: nothing to clear, nothing to tell
        st.served()
        self.streaking.discard(st.id)
        # a peer's digest naming a failure before this success must not bring it back
        self._cleared[st.id] = self._newest_flight if now is None else now
        if tell and self.outcomes is not None:
            self.outcomes.append((st.id, False))
            if self._notify is not None:
                self._notify()

    def working(self, pool: list[EndpointState], now: float) -> list[EndpointState]:
        """``pool`` without its broken endpoints (``EndpointState.broken``), at most half of it left out (the most
        recently failed first: a stranger whose requests fail cannot put a model's traffic on one engine, and a
        pool of one is never emptied). The pool list itself when no endpoint is broken: ``streaking`` holds the
        few that may be, and those whose hold lapsed leave it here, so the usual route pays one set test."""
        if not self.streaking:
            return pool
        broken = set()
        for eid in list(self.streaking):
            st = self.endpoints.get(eid)
            if st is None or not st.failing(now):
                self.streaking.discard(eid)  # its hold lapsed: the next failure starts a new streak
            elif st.broken(now):
                broken.add(eid)
        room = len(pool) // 2
        if not broken or not room:
            return pool
        mine = sorted((st for st in pool if st.id in broken), key=lambda st: st.failed_at or 0.0, reverse=True)
        out = {st.id for st in mine[:room]}
        return [st for st in pool if st.id not in out] if out else pool

    def flying(self, request_id: str) -> bool:
        """Whether ``request_id`` is dispatched and not yet finished (its endpoint may have left since: then not)."""
        return request_id in self._flights

    # -- derived --------------------------------------------------------------------------------------
    def is_stale(self, st: EndpointState, now: float) -> bool:
        """No metrics, or metrics older than the staleness bound."""
        m = st.metrics
        return m is None or now - m.ts > self.config.staleness_s

    def prefill_rate(self, st: EndpointState) -> float:
        """Peak prefill tokens/s of the endpoint: one full chunk of ``max_num_batched_tokens`` from an empty
        context on its own GPU's step-time model (llm-d's default constant when no model is known, or when the
        model's step time is not a positive finite number: the estimates divide by the rate)."""
        rate = self._prefill_rate.get(st.id)
        if rate is None:
            model = self.step_models.get(st.id)
            rate = DEFAULT_PREFILL_TOKENS_PER_S
            if model is not None:
                b = max(st.endpoint.max_num_batched_tokens, 1)
                got = b / max(model.step_time(b, 1, 1, b * (b + 1) // 2, b), 1e-9)
                if math.isfinite(got) and got > 0:
                    rate = got
            self._prefill_rate[st.id] = rate
        return rate


def effective_rate(st: EndpointState) -> float:
    """Prefill tokens/s the endpoint has beside its running decodes: ``rate × (1 − min(running, B/2)/B)``
    (each running request decodes one token of the step's ``B = max_num_batched_tokens`` budget)."""
    b = st.endpoint.max_num_batched_tokens or 1
    running = st.metrics.running if st.metrics is not None else 0
    return st.prefill_rate * (1.0 - min(running, b / 2) / b)
