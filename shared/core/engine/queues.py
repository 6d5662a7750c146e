"""Waiting queues: FCFS (a deque) and priority (a heap on ``(priority, arrival_time, uid)``)."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterator
from typing import Protocol

from shared.core.engine.request import Request


class WaitingQueue(Protocol):
    """What the scheduler needs from a waiting queue."""

    def add(self, req: Request) -> None:
        """Enqueue a newly arrived request."""

    def prepend(self, req: Request) -> None:
        """Put a preempted request back at the front (by the queue's own order)."""

    def peek(self) -> Request:
        """The next request to admit."""

    def pop(self) -> Request:
        """Remove and return the next request to admit."""

    def remove(self, req: Request) -> None:
        """Drop a request (abort)."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Request]: ...


class FcfsQueue(deque[Request]):
    """First come, first served; preempted requests jump to the front.

    A deque itself, so ``len`` (asked several times per step by the scheduler) is a C call rather than a
    Python method; the queue operations are the deque's own."""

    __slots__ = ()

    add = deque.append  # at the back
    prepend = deque.appendleft  # at the front
    pop = deque.popleft  # the front request

    def peek(self) -> Request:
        """The front request."""
        return self[0]


class PriorityQueue:
    """Lowest ``(priority, arrival_time, uid)`` first; a preempted request simply re-enters the heap.

    ``remove`` leaves the entry in the heap and forgets it (skipped when it comes up): rebuilt at every abort, the
    heap made aborting many waiting requests quadratic (20,000 took 16 s, the server unable to step meanwhile)."""

    __slots__ = ("_heap", "_live", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, int, Request]] = []
        self._live: dict[int, int] = {}  # uid -> the entry that stands for it (its number)
        self._seq = 0

    def add(self, req: Request) -> None:
        """Insert by key."""
        self._seq += 1
        self._live[req.uid] = self._seq
        heapq.heappush(self._heap, (req.priority, req.arrival_time, req.uid, self._seq, req))

    def prepend(self, req: Request) -> None:
        """Same as ``add``: the key already orders a preempted request before later arrivals."""
        self.add(req)

    def _settle(self) -> None:
        """Drop forgotten entries off the top."""
        heap, live = self._heap, self._live
        while heap and live.get(heap[0][2]) != heap[0][3]:
            heapq.heappop(heap)

    def peek(self) -> Request:
        """The most important request."""
        return self._heap[0][4]

    def pop(self) -> Request:
        """Remove the most important request."""
        entry = heapq.heappop(self._heap)
        del self._live[entry[2]]
        self._settle()
        return entry[4]

    def remove(self, req: Request) -> None:
        """Forget ``req`` (its entry is skipped when it reaches the top)."""
        if self._live.pop(req.uid, None) is not None:
            self._settle()
            if len(self._heap) > 2 * len(self._live) + 64:  # mostly forgotten entries: rebuilt, amortised O(1)
                self._heap = [e for e in self._heap if self._live.get(e[2]) == e[3]]
                heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Request]:
        live = self._live
        return iter(e[4] for e in sorted(e for e in self._heap if live.get(e[2]) == e[3]))


def make_queue(policy: str) -> FcfsQueue | PriorityQueue:
    """The waiting queue for a scheduling policy name."""
    return PriorityQueue() if policy == "priority" else FcfsQueue()
