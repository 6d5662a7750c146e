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
import time

RETRY_S = 0.005  # how often backlogged (slow-reading) clients are retried
MAX_BACKLOG_BYTES = 8 << 20  # a client this far behind has stopped reading: its request is aborted
STALL_S = 60.0  # a backlog that drains nothing for this long is a client gone quiet: its request is aborted
INLINE_MAX = 32
"""A step with at most this many writes sends them on the event loop's thread: waking the writer thread
costs more than a few sends."""


class Conn:
    """One stream's socket as the writer thread sees it."""

    __slots__ = ("_loop", "backlog", "closing", "dead", "fd", "flushed", "progress_at")

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        self.fd = fd
        # unsent bytes, appended to and trimmed in place: joined anew at every token, a client that stopped
        # reading cost CPU quadratic in its output (9 s of the writer for 40,000 tokens), GIL held
        self.backlog = bytearray()
        self.dead = False  # the peer went away (read by the step loop: the request is then aborted)
        self.closing = False  # its last bytes were handed over
        self.progress_at = 0.0  # when its backlog last drained something (monotonic; set by the writer thread)
        self._loop = loop
        self.flushed: asyncio.Future[None] = loop.create_future()

    def keep(self, rest: bytes | memoryview) -> None:
        """Hold ``rest`` as the backlog (nothing was held), or give up on a peer that far behind."""
        self.backlog += rest
        self._bound()

    def _bound(self) -> None:
        if len(self.backlog) > MAX_BACKLOG_BYTES:
            self.give_up()

    def give_up(self) -> None:
        """The peer is not reading (too far behind, or for too long): its request is aborted, its bytes dropped."""
        self.dead = True
        self.backlog = bytearray()

    def send(self, data: bytes) -> None:
        """Write what the socket takes now; keep the rest (whoever holds the writer's lock)."""
        if self.dead:
            return
        if not self.backlog:
            try:
                n = os.write(self.fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                self.dead = True
                return
            if n < len(data):
                self.keep(memoryview(data)[n:])
            return
        self.backlog += data
        try:
            n = os.write(self.fd, self.backlog)
        except BlockingIOError:
            n = 0
        except OSError:
            self.dead = True
            self.backlog = bytearray()
            return
        del self.backlog[:n]
        self._bound()

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


Write = tuple[Conn, bytes, bool]  # (connection, bytes, last write of the stream)


class SocketWriter:
    """Collects a step's writes on the event loop and sends them, inline or from a thread (``flush``).

    Sinks put a whole chunk for a healthy connection (no backlog) in ``fast`` and anything else (a stream's
    last bytes, a backlogged connection) in ``pending``; ``fast`` is sent first (a stream's last bytes follow
    its tokens). ``fast`` goes out in one C-level burst, ``os.write`` mapped over the step's sockets: no Python
    between two writes, so the reader (woken by the first) is still awake for the next ones, and no bytecode
    per token."""

    def __init__(self) -> None:
        self.fast: list[tuple[int, bytes, Conn]] = []  # (descriptor, whole chunk, connection)
        self.pending: list[Write] = []
        self._q: queue.SimpleQueue[tuple[list[tuple[int, bytes, Conn]], list[Write]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # held by whoever is sending: the thread, or the loop for a small step
        # batches handed to the thread, and those it has sent (each counter written by one thread only): the
        # loop sends inline only when they are equal, so a small step never overtakes a big one still queued
        self._put = 0
        self._done = 0

    def open(self, fd: int) -> Conn:
        """A connection for a dup of ``fd`` (the caller's descriptor stays its own)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sse-writer", daemon=True)
            self._thread.start()
        return Conn(os.dup(fd), asyncio.get_running_loop())

    def _idle_locked(self) -> bool:
        """Take the lock if the thread has nothing of ours left to send (True: the caller holds the lock)."""
        if self._put != self._done or not self._lock.acquire(blocking=False):
            return False
        if self._put != self._done:  # it finished taking a batch but not sending it
            self._lock.release()
            return False
        return True

    def flush(self) -> None:
        """Send this step's writes now if they are few and the thread is idle, else hand them to the thread."""
        fast, pending = self.fast, self.pending
        if not fast and not pending:
            return
        if len(fast) + len(pending) <= INLINE_MAX and self._idle_locked():
            try:
                # careful bursts: the thread may have given a connection a backlog (or lost its peer) after the
                # sinks looked, while it sent an earlier batch; such a connection's chunk must queue behind it
                if pending:
                    rest = self._send_all_inline(burst(fast, True) + pending if fast else pending)
                else:  # a decode step: only whole chunks; the careful path only for what did not go out whole
                    rest = burst(fast, True)
                    if rest:
                        rest = self._send_all_inline(rest)
            finally:
                self._lock.release()
            fast.clear()
            pending.clear()
            if rest:
                self._hand_over([], rest)  # slow readers: the thread keeps retrying them
            return
        self._hand_over(fast.copy(), pending.copy())
        fast.clear()  # in place: every sink appends to these very lists
        pending.clear()

    def _hand_over(self, fast: list[tuple[int, bytes, Conn]], pending: list[Write]) -> None:
        self._put += 1
        self._q.put((fast, pending))

    @staticmethod
    def _send_all_inline(pending: list[Write]) -> list[Write]:
        """Send writes now, on the loop's thread; what a socket did not take goes back for the thread."""
        rest: list[Write] = []
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
                    conn.keep(memoryview(data)[n:])
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
                batch = ([], [])
            if batch is None:
                for c in waiting:
                    c.release()
                return
            fast, pending = batch
            with self._lock:
                for conn, data, last in burst(fast, True) + pending if fast else pending:
                    conn.send(data)
                    if last:
                        conn.closing = True
                    if conn.backlog or conn.closing:
                        waiting.add(conn)
                if fast or pending:
                    self._done += 1
                now = time.monotonic()
                for conn in list(waiting):
                    if conn.backlog:
                        before = len(conn.backlog)
                        conn.send(b"")
                        if len(conn.backlog) < before or not conn.progress_at:
                            conn.progress_at = now
                        elif now - conn.progress_at > STALL_S:  # alive but reading nothing, for that long
                            conn.give_up()
                    if not conn.backlog:
                        conn.progress_at = 0.0  # a later backlog's clock starts when it does
                    if not conn.backlog or conn.dead:
                        waiting.discard(conn)
                        if conn.closing or conn.dead:
                            conn.release()


def burst(fast: list[tuple[int, bytes, Conn]], careful: bool) -> list[Write]:
    """Write each whole chunk to its socket in one C-level pass (whoever holds the writer's lock); returns what
    did not go out whole as writes for the careful path: a partial chunk's rest is the connection's backlog
    (then ``(conn, b"", False)``), a failed socket is marked dead. ``careful`` (the thread, which may have
    given a connection a backlog or lost its peer since its sink looked): any such connection sends the whole
    step the careful way, which appends behind the backlog."""
    fds, datas, conns = zip(*fast, strict=True)
    if careful:
        for c in conns:  # a Python loop: attrgetter on slots costs more than these few bytecodes
            if c.backlog or c.dead:
                return [(c, d, False) for _, d, c in fast]
    sent: list[int] = []
    while True:
        try:  # list.extend keeps what the map produced before an exception
            sent.extend(map(os.write, fds[len(sent):], datas[len(sent):]))
            break
        except BlockingIOError:
            sent.append(0)
        except OSError:
            conns[len(sent)].dead = True
            sent.append(-1)
    if sent == list(map(len, datas)):
        return []
    fix: list[Write] = []
    for conn, data, k in zip(conns, datas, sent, strict=True):
        if k == len(data):
            continue
        if k >= 0:
            conn.keep(memoryview(data)[k:])
        fix.append((conn, b"", False))
    return fix
