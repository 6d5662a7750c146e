"""The local broker: an in-memory FIFO in front of one engine, bounded by size and TTL (seed 003, "local").

Every request gets an answer: accepted requests are either handed to the engine (then the engine's outputs
are its answer) or, once they have waited ``ttl_s`` in the queue, a finished ``EXPIRED`` output; a put over
``max_size`` or with a duplicate or malformed id is refused in the put answer itself. The TTL bounds the wait
in the broker only: a request handed to the engine is the engine's. Pure: time is passed in.

Differences from FastDeploy's LocalScheduler, on purpose: expiry runs at every call, not only when the
queue is over capacity (so an expired request is always answered, never kept or dropped silently); the
expired requests are exactly those past the TTL (its ``_recycle`` skips every other one while popping).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence

import msgspec

from shared.core.queueing.admission import PullBudget, admit
from shared.core.queueing.params import UNBOUNDED, SchedulerParams
from shared.core.queueing.request import Output, PutAnswer, QueuedRequest, expiry_answer, is_expired

DUPLICATE = "duplicated request_id"


class LocalBroker:
    """Per-engine request broker with the seed's interface; deterministic and clock-free."""

    def __init__(self, params: SchedulerParams | None = None, node: str = "") -> None:
        self.params = (params or SchedulerParams()).checked()
        self.node = node
        self._queue: deque[QueuedRequest] = deque()  # accepted, not yet handed to the engine (FIFO)
        self._held: dict[str, QueuedRequest] = {}  # every unfinished request: queued or dispatched
        self._responses: dict[str, list[Output]] = {}
        self._dispatched: dict[str, int] = {}  # handed to the engine, not finished -> the last chunk number taken
        # finished within the TTL -> when, in finishing order: a replay of the id is refused, as the global broker
        # refuses it (served again, one request was answered twice)
        self._done: OrderedDict[str, float] = OrderedDict()
        self.expired_total = 0
        self.rejected_total = 0
        self._unordered = False  # adopted requests may be older than the head: expiry scans the whole queue

    # -- the seed's interface -------------------------------------------------------------------------
    def put_requests(self, reqs: Sequence[QueuedRequest], now: float) -> list[PutAnswer]:
        """Queue ``reqs``; per request ``(id, None)`` or ``(id, why not)``. A batch over the bound is refused whole."""
        self.expire(now)
        answers: list[PutAnswer] = []
        fresh: list[QueuedRequest] = []
        seen: set[str] = set()
        for r in reqs:
            problem = r.problem()
            if problem is not None:
                answers.append((r.request_id, f"invalid request: {problem}"))
            elif (r.request_id in self._held or r.request_id in self._responses or r.request_id in seen
                  or r.request_id in self._done):
                answers.append((r.request_id, DUPLICATE))
            else:
                seen.add(r.request_id)
                fresh.append(msgspec.structs.replace(r, arrival_s=now))  # the TTL counts from acceptance
        bound = self.params.max_size
        if bound != UNBOUNDED and len(self._held) + len(fresh) > bound:
            self.rejected_total += len(fresh)
            why = (f"Exceeding the max length of the local scheduler (scheduler_max_size={bound}, "
                   f"holding {len(self._held)}, asked for {len(fresh)} more)")
            return [(r.request_id, why) for r in fresh] + answers
        for r in fresh:
            self._held[r.request_id] = r
            self._queue.append(r)
        return [(r.request_id, None) for r in fresh] + answers

    def get_requests(self, budget: PullBudget, now: float) -> list[QueuedRequest]:
        """Hand the engine the head of the queue that fits ``budget`` (expired requests answered first)."""
        self.expire(now)
        # (the head only: a copy of the whole queue at every pull cost 557 µs at 100,000 queued)
        n = admit(list(itertools.islice(self._queue, max(budget.batch, 0))), budget) if self._queue else 0
        out = [self._queue.popleft() for _ in range(n)]
        for r in out:
            self._dispatched[r.request_id] = -1
        return out

    def put_results(self, outputs: Iterable[Output]) -> list[str]:
        """Record engine outputs; returns the ids whose output was dropped: unknown, still queued (never handed to
        the engine: a late output of an earlier run), already finished, or a chunk already taken (a retry)."""
        dropped: list[str] = []
        for out in outputs:
            last = self._dispatched.get(out.request_id)
            if last is None or out.seq <= last:
                dropped.append(out.request_id)
                continue
            self._dispatched[out.request_id] = out.seq
            self._responses.setdefault(out.request_id, []).append(out)
        return dropped

    def get_results(self, now: float) -> dict[str, list[Output]]:
        """Every output since the last call by request id; finished requests are forgotten."""
        self.expire(now)
        out, self._responses = self._responses, {}
        for rid, chunks in out.items():
            if any(c.finished for c in chunks):
                self._held.pop(rid, None)
                self._dispatched.pop(rid, None)
                self._done[rid] = now
        return out

    # -- moving work between nodes (global mode in virtual time; Redis does this in the real system) --------
    def head(self, n: int) -> list[QueuedRequest]:
        """The first ``n`` queued requests, left in place."""
        return [self._queue[i] for i in range(min(n, len(self._queue)))]

    def release(self, n: int) -> list[QueuedRequest]:
        """Remove the first ``n`` queued requests for another node to serve (they stop counting here)."""
        out = [self._queue.popleft() for _ in range(min(n, len(self._queue)))]
        for r in out:
            self._held.pop(r.request_id, None)
        return out

    def adopt(self, reqs: Iterable[QueuedRequest]) -> int:
        """Queue requests recovered from a dead node as they are: never refused, arrival kept; how many."""
        n = 0
        for r in reqs:
            if r.request_id not in self._held:
                self._held[r.request_id] = r
                self._unordered = self._unordered or bool(self._queue)
                self._queue.append(r)
                n += 1
        return n

    # -- more views -----------------------------------------------------------------------------------
    def expire(self, now: float) -> list[str]:
        """Answer every queued request past the TTL with an ``EXPIRED`` output; their ids."""
        ttl = self.params.ttl_s
        done = self._done
        while done and next(iter(done.values())) <= now - ttl:  # the oldest first
            done.popitem(last=False)
        if not self._queue:
            self._unordered = False
            return []
        if not self._unordered and not is_expired(self._queue[0], now, ttl):
            return []  # FIFO by acceptance time: the head is the oldest
        keep: deque[QueuedRequest] = deque()
        gone: list[str] = []
        for r in self._queue:
            if is_expired(r, now, ttl):
                gone.append(r.request_id)
                self._held.pop(r.request_id, None)  # answered: it no longer takes room
                self._responses.setdefault(r.request_id, []).append(expiry_answer(r, now, ttl, self.node))
            else:
                keep.append(r)
        self._queue = keep
        self.expired_total += len(gone)
        return gone

    def has_request(self, request_id: str) -> bool:
        """True while the request is held (queued or being served)."""
        return request_id in self._held

    def unhandled(self) -> int:
        """Requests queued and not yet handed to the engine (FastDeploy's ``get_unhandled_request_num``)."""
        return len(self._queue)

    def held(self) -> int:
        """Requests counted against ``scheduler_max_size``."""
        return len(self._held)

    def reset(self) -> None:
        """Forget every request held (engine restart): queued, handed to the engine, and their outputs not taken;
        a late output of one is then dropped. The finished ids are kept: a replay of one is still refused."""
        self._queue.clear()
        self._held.clear()
        self._responses.clear()
        self._dispatched.clear()
        self._unordered = False
