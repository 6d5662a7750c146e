"""The calls of the picker's HTTP/2 gRPC server (``h2grpc``): each call's inbox of request messages, what it has
waiting to be sent, and the per-second budgets a connection's peer is held to. Pure bookkeeping: the connection
(``h2grpc.H2Connection``) does the reading and writing."""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import AsyncIterator, Callable

Handler = Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]]
"""One gRPC method: the call's request messages in, its response messages out (raw protobuf bytes); a
``CallError`` ends the call with that status, any other exception with INTERNAL."""


class CallError(Exception):
    """Ends a call with gRPC ``status`` and ``message`` (raised by a handler)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Inbox:
    """One call's request messages, in order, as its handler's async iterator. Taking a message grants the
    peer its bytes back in the stream's window, so unread messages are bounded by the window."""

    __slots__ = ("_ended", "_msgs", "_taken", "_waiter")

    def __init__(self, taken: Callable[[int], None]) -> None:
        self._msgs: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._taken = taken

    def put(self, msg: bytes) -> None:
        """A whole message arrived."""
        self._msgs.append(msg)
        self._wake()

    def end(self) -> None:
        """The peer ended its side: no more messages."""
        self._ended = True
        self._wake()

    def drop(self) -> tuple[int, int]:
        """Forget the messages not taken (the call is over); returns how many and their framed bytes."""
        got = len(self._msgs), sum(len(m) + 5 for m in self._msgs)
        self._msgs.clear()
        return got

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __aiter__(self) -> Inbox:
        return self

    async def __anext__(self) -> bytes:
        while not self._msgs:
            if self._ended:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        msg = self._msgs.popleft()
        self._taken(len(msg) + 5)
        return msg


class Stream:
    """One call on a connection: what has arrived of its current message, its inbox and handler, and what waits
    for the peer's window to be sent."""

    __slots__ = (
        "drained",
        "headers_sent",
        "id",
        "inbox",
        "partial",
        "pending",
        "recv_window",
        "remote_done",
        "send_credit",
        "task",
        "trailers",
        "unacked",
    )

    def __init__(self, sid: int, recv_window: int, taken: Callable[[int], None]) -> None:
        self.id = sid
        self.inbox = Inbox(taken)
        self.task: asyncio.Task[None] | None = None
        self.partial = bytearray()
        self.recv_window = recv_window
        self.unacked = 0  # bytes the handler took, not yet granted back to the peer
        # its send window less the peer's initial one: a SETTINGS change of that moves every stream's window in
        # O(1) (a peer can send SETTINGS as often as the budget lets it)
        self.send_credit = 0
        self.pending = bytearray()  # DATA payload waiting for window
        self.headers_sent = False
        self.remote_done = False
        self.trailers: bytes | None = None  # the trailer block, once the handler ended, sent after ``pending``
        self.drained: asyncio.Future[None] | None = None  # the handler waiting for its answers to leave


class Budget:
    """At most ``per_second`` events in any one-second window that starts with an event."""

    __slots__ = ("per_second", "since", "used")

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self.used = 0
        self.since = -math.inf

    def take(self) -> bool:
        """Count one event; False when it is over the budget."""
        now = time.monotonic()
        if now - self.since >= 1.0:
            self.since, self.used = now, 0
        self.used += 1
        return self.used <= self.per_second


def wake(st: Stream) -> None:
    """Let ``st``'s handler go on: its answers have left."""
    if st.drained is not None and not st.drained.done():
        st.drained.set_result(None)
