"""A thread that writes streamed token chunks to client sockets, beside the step loop.

Sending a small TCP segment on loopback costs several µs of kernel time per token (the kernel also runs the
receiver's side and wakes it up); at hundreds of streams that alone fills the event-loop thread's step. The
step loop therefore only encodes: each step's chunks go to this thread in one hand-off, and the thread does
the ``send`` calls, which release the GIL, so the kernel's share runs on the other core.

Each stream writes to its own ``dup`` of the connection's socket, so the descriptor stays valid (and cannot
be reused by another connection) even if the server closes its own after a disconnect. The server wrote the
response headers before, and writes the end of the chunked body after :attr:`Conn.flushed` resolves, so the
bytes on the wire stay in order. A slow client's unsent bytes wait in its own backlog; the others go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading

RETRY_S = 0.005  # how often backlogged (slow-reading) clients are retried
INLINE_MAX = 32
"""A step with at most this many writes sends them on the event loop's thread: waking the writer thread
costs more than a few sends."""


class Conn:
    """One stream's socket as the writer thread sees it."""

    __slots__ = ("_loop", "backlog", "closing", "dead", "fd", "flushed")

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        self.fd = fd
        self.backlog = b""
        self.dead = False  # the peer went away (read by the step loop: the request is then aborted)
        self.closing = False  # its last bytes were handed over
        self._loop = loop
        self.flushed: asyncio.Future[None] = loop.create_future()

    def send(self, data: bytes) -> None:
        """Write what the socket takes now; keep the rest (whoever holds the writer's lock)."""
        if self.dead:
            return
        if self.backlog:
            data = self.backlog + data
        try:
            n = os.write(self.fd, data)
        except BlockingIOError:
            n = 0
        except OSError:
            self.dead = True
            self.backlog = b""
            return
        self.backlog = data[n:] if n < len(data) else b""

    def release(self, on_loop: bool = False) -> None:
        """Close the descriptor and tell the event loop that everything is out (``on_loop``: called on the
        loop's own thread, which then needs no wake-up)."""
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = -1
        if on_loop:
            _resolve(self.flushed)
            return
        with contextlib.suppress(RuntimeError):  # the loop may already be closed at shutdown
            self._loop.call_soon_threadsafe(_resolve, self.flushed)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class SocketWriter:
    """Collects a step's writes on the event loop (``pending``) and sends them from a thread (``flush``)."""

    def __init__(self) -> None:
        self.pending: list[tuple[Conn, bytes, bool]] = []  # (conn, bytes, last write of the stream)
        self._q: queue.SimpleQueue[list[tuple[Conn, bytes, bool]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # held by whoever is sending: the thread, or the loop for a small step
        # batches handed to the thread, and those it has sent (each counter written by one thread only): the
        # loop sends inline only when they are equal, so a small step never overtakes a big one still queued
        self._put = 0
        self._done = 0
        self.direct = False  # between begin() and flush(): the loop holds the lock, sinks may os.write themselves

    def open(self, fd: int) -> Conn:
        """A connection for a dup of ``fd`` (the caller's descriptor stays its own)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sse-writer", daemon=True)
            self._thread.start()
        return Conn(os.dup(fd), asyncio.get_running_loop())

    def begin(self, writes: int) -> None:
        """A step is about to hand out ``writes`` chunks: if that is few and the thread is idle, take the lock
        until :meth:`flush`, so that sinks write their chunks straight to their sockets (``direct``) instead
        of queueing a tuple each for a second pass."""
        if writes <= INLINE_MAX and self._idle_locked():
            self.direct = True

    def _idle_locked(self) -> bool:
        """Take the lock if the thread has nothing of ours left to send (True: the caller holds the lock)."""
        if self._put != self._done or not self._lock.acquire(blocking=False):
            return False
        if self._put != self._done:  # it finished taking a batch but not sending it
            self._lock.release()
            return False
        return True

    def flush(self) -> None:
        """Hand this step's writes to the thread (one hand-off per step)."""
        pending = self.pending
        if self.direct:
            self.direct = False
            try:
                rest = self._send_all_inline(pending) if pending else []
            finally:
                self._lock.release()
            pending.clear()
            if rest:
                self._hand_over(rest)
            return
        if not pending:
            return
        if len(pending) <= INLINE_MAX and self._idle_locked():
            try:
                rest = self._send_all_inline(pending)
            finally:
                self._lock.release()
            pending.clear()
            if rest:
                self._hand_over(rest)  # slow readers: the thread keeps retrying them
            return
        batch = pending.copy()
        pending.clear()  # in place: every sink appends to this very list
        self._hand_over(batch)

    def _hand_over(self, batch: list[tuple[Conn, bytes, bool]]) -> None:
        self._put += 1
        self._q.put(batch)

    @staticmethod
    def _send_all_inline(pending: list[tuple[Conn, bytes, bool]]) -> list[tuple[Conn, bytes, bool]]:
        """Send a step's writes now, on the loop's thread; what a socket did not take goes back for the thread.

        One ``os.write`` per stream and no call in between: at a few dozen streams per step the Python around
        the system call costs as much as the call."""
        rest: list[tuple[Conn, bytes, bool]] = []
        write = os.write
        for conn, data, last in pending:
            if conn.backlog or conn.dead:
                conn.send(data)
            else:
                try:
                    n = write(conn.fd, data)
                except BlockingIOError:
                    n = 0
                except OSError:
                    conn.dead = True
                    n = len(data)
                if n == len(data) and not last:
                    continue  # the common case: all of it went, the stream goes on
                if n < len(data):
                    conn.backlog = data[n:]
            if conn.backlog and not conn.dead:
                rest.append((conn, b"", last))
            elif last or conn.dead:
                conn.release(on_loop=True)
        return rest

    def close(self) -> None:
        """Stop the thread once what it was given is written."""
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        waiting: set[Conn] = set()  # backlogged or closing with a backlog
        q = self._q
        while True:
            try:
                batch = q.get(timeout=RETRY_S) if waiting else q.get()
            except queue.Empty:
                batch = []
            if batch is None:
                for c in waiting:
                    c.release()
                return
            with self._lock:
                write = os.write
                for conn, data, last in batch:
                    if last or conn.backlog or conn.dead:
                        conn.send(data)
                        if last:
                            conn.closing = True
                        if conn.backlog or conn.closing:
                            waiting.add(conn)
                        continue
                    try:  # the common case without a method call: a whole chunk to a socket that takes it
                        n = write(conn.fd, data)
                    except BlockingIOError:
                        n = 0
                    except OSError:
                        conn.dead = True
                        continue
                    if n < len(data):
                        conn.backlog = data[n:]
                        waiting.add(conn)
                if batch:
                    self._done += 1
                for conn in list(waiting):
                    if conn.backlog:
                        conn.send(b"")
                    if not conn.backlog or conn.dead:
                        waiting.discard(conn)
                        if conn.closing or conn.dead:
                            conn.release()
