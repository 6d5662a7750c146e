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
    """Lowest ``(priority, arrival_time, uid)`` first; a preempted request simply re-enters the heap."""

    __slots__ = ("_heap",)

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []

    def add(self, req: Request) -> None:
        """Insert by key."""
        heapq.heappush(self._heap, (req.priority, req.arrival_time, req.uid, req))

    def prepend(self, req: Request) -> None:
        """Same as ``add``: the key already orders a preempted request before later arrivals."""
        self.add(req)

    def peek(self) -> Request:
        """The most important request."""
        return self._heap[0][3]

    def pop(self) -> Request:
        """Remove the most important request."""
        return heapq.heappop(self._heap)[3]

    def remove(self, req: Request) -> None:
        """Drop ``req`` and restore the heap."""
        self._heap = [e for e in self._heap if e[3] is not req]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return iter(e[3] for e in sorted(self._heap, key=lambda e: e[:3]))


def make_queue(policy: str) -> FcfsQueue | PriorityQueue:
    """The waiting queue for a scheduling policy name."""
    return PriorityQueue() if policy == "priority" else FcfsQueue()
