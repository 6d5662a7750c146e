"""Flow control: requests wait in the router instead of being dropped, and leave in a fair order.

Modelled on llm-d router flow control (``../shared/research/routing.md`` §1.6) and Dynamo's router queue:

1. **priority bands**: strictly higher priority first;
2. **fairness between tenants** within a band: ``round-robin`` (each tenant with work in turn) or
   ``global-strict`` (the band's single best head, ignoring tenants);
3. **ordering within a tenant**: ``fcfs`` (arrival order) or ``edf`` (earliest deadline first: arrival +
   TTFT SLO when given, else the TTL);
4. **bounds**: at most ``max_queued`` requests, ``max_queued_per_band`` per band and (when set)
   ``max_queued_per_tenant`` per fairness id in a band; over them a request is refused at once (429, "queue
   full"), never silently dropped; a request still queued ``ttl_s`` after it arrived is answered with an expiry
   (504) by ``expire``. Memory follows the waiting requests: one cancelled or expired out of order is reclaimed
   (a queue, or the expiry heap, is rebuilt once half of it is such entries), so a pool that stays saturated
   while requests come and go holds at most about twice what waits.

Dispatch happens when the saturation detector shows headroom (late binding: the request is routed only
when it leaves the queue, so it sees fresh scores). Pure: time is passed in.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from shared.core.routing.domain import EXPIRED, QUEUE_FULL, Refusal, RouteRequest


class FlowConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Bounds and policies (TTL in seconds: the seed's 900 s default)."""

    max_queued: int = 10_000
    max_queued_per_band: int = 5_000
    # one fairness id (tenant) may hold at most this many of a band's places (0: no bound of its own, as GIE): a
    # tenant flooding its band otherwise gets every other tenant's requests refused until it drains
    max_queued_per_tenant: int = 0
    ttl_s: float = 900.0
    ordering: Literal["fcfs", "edf"] = "fcfs"
    fairness: Literal["round-robin", "global-strict"] = "round-robin"

    def problems(self) -> list[str]:
        """Invalid settings as sentences."""
        out = []
        if self.max_queued < 0 or self.max_queued_per_band < 0 or self.max_queued_per_tenant < 0:
            out.append("max_queued, max_queued_per_band and max_queued_per_tenant must be >= 0")
        if not self.ttl_s > 0:
            out.append(f"ttl_s must be > 0 (got {self.ttl_s})")
        return out


@dataclass(order=True, slots=True)
class _Item:
    key: tuple[float, int]  # ordering key within the tenant queue (deadline or arrival, then sequence)
    seq: int = field(compare=False)
    request: RouteRequest = field(compare=False)
    enqueued_at: float = field(compare=False)
    expires_at: float = field(compare=False)
    band: int = field(compare=False)
    tenant: str = field(compare=False)
    live: bool = field(default=True, compare=False)


COMPACT_MIN = 64  # dead entries the expiry heap may hold before half of it dead rebuilds it


class _TenantQueue:
    """One tenant's requests in their order. A request taken out of order (cancelled, expired) stays as a dead
    entry until it reaches the head or the queue is rebuilt, which happens as soon as more of it is dead than live
    (amortised O(1) a removal): memory stays within twice the live requests while a saturated pool never pops, for
    any number of tenants (a floor per queue let each fairness id, a client's header, keep 63 dead requests)."""

    __slots__ = ("dead", "edf", "heap", "items", "live")

    def __init__(self, edf: bool) -> None:
        self.edf = edf
        self.items: deque[_Item] = deque()
        self.heap: list[_Item] = []
        self.live = 0
        self.dead = 0

    def push(self, it: _Item, front: bool = False) -> None:
        if self.edf:
            heapq.heappush(self.heap, it)
        elif front:
            self.items.appendleft(it)
        else:
            self.items.append(it)
        self.live += 1

    def dropped(self) -> None:
        """One of its requests was taken out of order (already marked dead)."""
        self.live -= 1
        self.dead += 1
        if self.dead > self.live:
            if self.edf:
                self.heap = [it for it in self.heap if it.live]
                heapq.heapify(self.heap)
            else:
                self.items = deque(it for it in self.items if it.live)
            self.dead = 0

    def _clean(self) -> None:
        if self.edf:
            while self.heap and not self.heap[0].live:
                heapq.heappop(self.heap)
                self.dead -= 1
        else:
            while self.items and not self.items[0].live:
                self.items.popleft()
                self.dead -= 1

    def head(self) -> _Item | None:
        self._clean()
        if self.edf:
            return self.heap[0] if self.heap else None
        return self.items[0] if self.items else None

    def pop(self) -> _Item:
        self._clean()
        self.live -= 1
        return heapq.heappop(self.heap) if self.edf else self.items.popleft()


class FlowController:
    """Queues of one pool: bands → tenants → ordered requests."""

    def __init__(self, config: FlowConfig | None = None) -> None:
        self.config = config or FlowConfig()
        problems = self.config.problems()
        if problems:
            raise ValueError("flow control: " + "; ".join(problems))
        self._bands: dict[int, OrderedDict[str, _TenantQueue]] = {}
        self._band_size: dict[int, int] = {}
        self._expiry: list[tuple[float, int, _Item]] = []
        self._expiry_dead = 0  # entries of the expiry heap whose request has left (dispatched or cancelled)
        self._ids: dict[str, _Item] = {}
        self._seq = 0
        self._size = 0
        self._last: _Item | None = None  # the request ``pop`` returned last (``putback``)

    def __len__(self) -> int:
        """Requests waiting."""
        return self._size

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._ids

    def enqueue(self, request: RouteRequest, now: float) -> Refusal | None:
        """Queue ``request``; a refusal (429) when a bound is reached. A request id already queued is ignored."""
        if request.request_id in self._ids:
            return None
        cfg = self.config
        band = request.priority
        if self._size >= cfg.max_queued:
            return Refusal(request.request_id, QUEUE_FULL, f"flow control: queue full ({cfg.max_queued} waiting)")
        if self._band_size.get(band, 0) >= cfg.max_queued_per_band:
            return Refusal(request.request_id, QUEUE_FULL,
                           f"flow control: priority band {band} full ({cfg.max_queued_per_band} waiting)")
        tenants = self._bands.get(band)
        q = tenants.get(request.tenant) if tenants is not None else None
        if cfg.max_queued_per_tenant and q is not None and q.live >= cfg.max_queued_per_tenant:
            return Refusal(request.request_id, QUEUE_FULL, f"flow control: {cfg.max_queued_per_tenant} requests of "
                                                           f"this fairness id already waiting in band {band}")
        self._seq += 1
        expires = now + cfg.ttl_s
        edf = cfg.ordering == "edf"
        deadline = now + request.slo_ttft_s if request.slo_ttft_s is not None else expires
        it = _Item((deadline if edf else now, self._seq), self._seq, request, now, expires, band, request.tenant)
        if tenants is None:
            tenants = self._bands[band] = OrderedDict()
        if q is None:
            q = tenants[request.tenant] = _TenantQueue(edf)
        q.push(it)
        heapq.heappush(self._expiry, (expires, it.seq, it))
        self._ids[request.request_id] = it
        self._band_size[band] = self._band_size.get(band, 0) + 1
        self._size += 1
        return None

    def _take(self, it: _Item) -> RouteRequest:
        it.live = False
        del self._ids[it.request.request_id]
        left = self._band_size[it.band] - 1
        if left:
            self._band_size[it.band] = left
        else:
            del self._band_size[it.band]  # one key per priority ever queued would be kept otherwise
        self._size -= 1
        return it.request

    def _left_early(self, it: _Item) -> None:
        """``it`` (taken) left its tenant's queue out of order: the queue reclaims it, and goes when empty."""
        tenants = self._bands.get(it.band)
        q = tenants.get(it.tenant) if tenants is not None else None
        if q is None:
            return
        q.dropped()
        if not q.live:
            assert tenants is not None
            del tenants[it.tenant]
            if not tenants:
                del self._bands[it.band]

    def _left_expiry(self) -> None:
        """A request left before its expiry: its entry stays in the heap until half of the heap is such entries."""
        self._expiry_dead += 1
        if self._expiry_dead >= COMPACT_MIN and 2 * self._expiry_dead > len(self._expiry):
            self._expiry = [e for e in self._expiry if e[2].live]
            heapq.heapify(self._expiry)
            self._expiry_dead = 0

    def pop(self) -> RouteRequest | None:
        """The next request to dispatch (None when empty): highest band, then fairness, then ordering."""
        for band in sorted(self._bands, reverse=True):
            tenants = self._bands[band]
            if self.config.fairness == "round-robin":
                for tenant in list(tenants):
                    q = tenants[tenant]
                    head = q.head()
                    tenants.move_to_end(tenant)  # this tenant had its turn (or is empty)
                    if head is None:
                        del tenants[tenant]
                        continue
                    return self._dispatched(q.pop())
            else:
                best: tuple[tuple[float, int], str] | None = None
                for tenant, q in list(tenants.items()):
                    head = q.head()
                    if head is None:
                        del tenants[tenant]
                    elif best is None or head.key < best[0]:
                        best = (head.key, tenant)
                if best is not None:
                    return self._dispatched(tenants[best[1]].pop())
            if not tenants:
                del self._bands[band]
        return None

    def _dispatched(self, it: _Item) -> RouteRequest:
        request = self._take(it)  # dead first: a rebuild of the expiry heap must leave its entry out
        self._left_expiry()
        self._last = it
        return request

    def putback(self) -> None:
        """Return the request ``pop`` returned last to where it was (the head of its fairness id's queue, its
        arrival, deadline and expiry as they were): none of the endpoints with room could take it."""
        it, self._last = self._last, None
        if it is None or it.request.request_id in self._ids:
            return
        again = _Item(it.key, it.seq, it.request, it.enqueued_at, it.expires_at, it.band, it.tenant)
        tenants = self._bands.get(it.band)
        if tenants is None:
            tenants = self._bands[it.band] = OrderedDict()
        q = tenants.get(it.tenant)
        if q is None:
            q = tenants[it.tenant] = _TenantQueue(self.config.ordering == "edf")
        q.push(again, front=True)
        heapq.heappush(self._expiry, (again.expires_at, again.seq, again))
        self._ids[again.request.request_id] = again
        self._band_size[again.band] = self._band_size.get(again.band, 0) + 1
        self._size += 1

    def cancel(self, request_id: str) -> bool:
        """Remove a queued request (client went away); False when it is not queued."""
        it = self._ids.get(request_id)
        if it is None:
            return False
        self._take(it)
        self._left_early(it)
        self._left_expiry()
        return True

    def held(self) -> int:
        """Entries held in memory, live or awaiting reclaim (at most about twice the waiting requests, plus a
        constant): what bounds the controller's memory while ``len`` bounds what waits."""
        queues = sum(len(q.heap) + len(q.items) for tenants in self._bands.values() for q in tenants.values())
        return queues + len(self._expiry)

    def expire(self, now: float) -> list[Refusal]:
        """Answer every request queued for ``ttl_s`` or longer with an expiry (504)."""
        out: list[Refusal] = []
        heap = self._expiry
        while heap and heap[0][0] <= now:
            _, _, it = heapq.heappop(heap)
            if not it.live:
                self._expiry_dead -= 1
                continue
            self._take(it)
            self._left_early(it)
            waited = now - it.enqueued_at
            out.append(Refusal(it.request.request_id, EXPIRED,
                               f"flow control: waited {waited:.1f} s, over the {self.config.ttl_s:g} s TTL"))
        return out
