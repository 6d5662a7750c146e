"""Just enough HTTP/1.1 server framing for Envoy's ``ext_authz`` checks: an ``asyncio.Protocol`` (run on uvloop)
that cuts a kept-alive connection into requests (head, ``content-length`` body) and writes each answer in order.

Why not a framework: the picker's check is one small request per client request, and every microsecond of
Python on it is latency Envoy waits for (docs/gateway.md, "Cheaper hops to Python"). What Envoy sends is
narrow, so what this does not understand closes the connection rather than guessing at the framing: a head
past ``MAX_HEAD_BYTES``, a missing, negative, garbled, conflicting or too large ``content-length`` on a
request that has a body, or any ``transfer-encoding``. An answer that raises closes the connection too (the
check then fails on Envoy's side, and its failure mode decides), and so does a request that has begun but is not
whole ``READ_TIMEOUT_S`` later (a client sending a byte at a time would hold its connection and buffer for ever;
Envoy sends a check at once). Nothing here crashes the server.

Connections are bounded when given a ``Connections`` (the picker's listener): one idle (nothing buffered, no
answer awaited) for ``idle_timeout_s`` is closed, and past ``max_connections`` open a new one is closed at once.
Envoy pools its connections to the picker and closes an idle one itself, sooner (``protocol.envoy_idle_timeout_s``),
so the picker's close does not race a check Envoy is writing; what the picker closes is a stranger's (and if the two
timeouts were given apart, a check the close cuts, never read here, is sent again by Envoy: docs/gateway.md).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import cast

log = logging.getLogger("gantry.gateway")

MAX_HEAD_BYTES = 64 << 10  # request line and headers; Envoy's own default limit is 60 KiB
MAX_BODY_BYTES = 32 << 20  # the largest body a check may carry (the picker refuses larger ones as 400 anyway)
MALFORMED = -1
READ_TIMEOUT_S = 30.0  # a begun request must be whole within this
# request bytes all of a listener's HTTP/1.1 connections may hold at once: each may hold a head and a body while they
# arrive (up to ~32 MiB for READ_TIMEOUT_S), so a thousand slow clients could otherwise hold tens of GiB
MAX_HELD_BYTES = 512 << 20

Answer = Callable[[bytes, bytes], "bytes | Awaitable[bytes]"]
"""Request head (request line and headers, without the blank line) and body -> the whole HTTP response, at
once or when awaited."""
Unsent = Callable[[bytes], None]
"""Told of an awaited answer its connection closed before (the peer timed out or reset it): it never left."""


def content_length(head: bytes | bytearray, limit: int = MAX_BODY_BYTES) -> int:
    """The body length a request head announces: 0 without ``content-length``, ``MALFORMED`` when the value is
    not a non-negative integer, exceeds ``limit``, is given twice with different values, or the head asks for a
    ``transfer-encoding`` (not supported here)."""
    found: int | None = None
    for line in head.split(b"\r\n")[1:]:
        name = line[:18].lower()
        if name.startswith(b"transfer-encoding:"):
            return MALFORMED
        if name.startswith(b"content-length:"):
            value = line[15:].strip()
            if not value.isdigit() or len(value) > 12 or int(value) > limit:
                return MALFORMED
            if found is not None and found != int(value):
                return MALFORMED
            found = int(value)
    return found or 0


def headers_of(head: bytes) -> dict[str, str]:
    """Lower-cased header names to values, plus ``:method`` and ``:path`` from the request line (as the picker
    reads Envoy's ext_proc headers); an unreadable request line gives empty pseudo-headers."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    out = {":method": parts[0] if len(parts) == 3 else "", ":path": parts[1] if len(parts) == 3 else ""}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        out[key.strip().lower()] = value.strip()
    return out


def header_values(head: bytes, name: str) -> list[str]:
    """Every value of header ``name`` (lower case) in ``head``, in order: ``headers_of`` keeps only the last of
    repeated lines, where a list-valued header's lines together make its value (as Envoy joins them)."""
    out = []
    for line in head.decode("latin-1").split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            out.append(value.strip())
    return out


def response(code: int, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A whole HTTP/1.1 response (kept alive)."""
    extra = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers)
    return b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\n%s\r\n%s" % (code, _REASONS.get(code, b"X"), len(body), extra,
                                                                  body)


_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 429: b"Too Many Requests",
            500: b"Internal Server Error", 503: b"Service Unavailable"}


REFUSED_LOG_EVERY_S = 10.0  # at most one line this often about connections refused at the cap


class Swept(asyncio.Protocol):
    """A connection under a ``Connections``' cap and idle sweep: it flags its activity in ``seen``, says when
    an answer is awaited (``busy``: not idle) or a request is partly read (``buf``), and closes when told."""

    seen: bool
    quiet_since: float
    buf: bytearray
    busy: bool  # an answer is awaited or a call open: not idle, whatever the time

    def close(self) -> None:
        """Close the connection now (idle too long)."""
        raise NotImplementedError


class Connections:
    """The open connections of one listener: at most ``max_connections``, each closed once idle for
    ``idle_timeout_s``. Idle is found by a sweep every ``idle_timeout_s / SWEEPS`` over a flag each
    connection sets on activity (a byte in, an awaited answer out): a request costs one attribute store, no
    timer re-armed and no clock read. A connection is closed no sooner than ``idle_timeout_s`` after its last
    activity, and within ``idle_timeout_s * (1 + 2 / SWEEPS)``."""

    SWEEPS = 4

    def __init__(self, idle_timeout_s: float, max_connections: int) -> None:
        if not (idle_timeout_s > 0 and math.isfinite(idle_timeout_s)) or max_connections < 1:
            raise ValueError(f"idle timeout must be > 0 s and finite, connections >= 1 (got {idle_timeout_s} s, "
                             f"{max_connections})")
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        self.open: set[Swept] = set()
        # TLS connections accepted and still in their handshake (``tls.TlsListener``): each holds a descriptor as an
        # open one does, so they count under ``max_connections`` too (the handshake timeout alone bounds their time)
        self.handshaking: set[Swept] = set()
        self.refused = 0  # connections closed at once, the cap reached
        self.idle_closed = 0  # connections closed idle
        self.held = 0  # request bytes buffered by the open HTTP/1.1 connections, all together
        self.max_held = MAX_HELD_BYTES
        self.over_held = 0  # connections closed for taking the buffered bytes past ``max_held``
        self._refused_logged = 0
        self._logged_at = -math.inf

    def admit(self, conn: Swept) -> bool:
        """Take a new connection, or count it refused (the caller closes it) when ``max_connections`` are open
        or handshaking. A connection counted since its accept (``handshake_begins``) keeps the place it holds."""
        if conn in self.handshaking:
            self.handshaking.discard(conn)
            self.open.add(conn)
            return True
        return self._take(self.open, conn)

    def handshake_begins(self, conn: Swept) -> bool:
        """Count a TLS connection from its accept, through its handshake, until it is ``admit``-ted or
        ``handshake_ends``; False (counted refused, the caller closes it) when ``max_connections`` are open or
        handshaking."""
        return self._take(self.handshaking, conn)

    def _take(self, into: set[Swept], conn: Swept) -> bool:
        """Put ``conn`` in ``into`` if open and handshaking connections leave room under the cap, else count it
        refused."""
        if len(self.open) + len(self.handshaking) < self.max_connections:
            into.add(conn)
            return True
        self._refuse()
        return False

    def handshake_ends(self, conn: Swept) -> None:
        """The handshake of ``conn`` is over: its place is freed unless it was ``admit``-ted (the handshake
        failed, timed out, or the peer left)."""
        self.handshaking.discard(conn)

    def _refuse(self) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._logged_at >= REFUSED_LOG_EVERY_S:  # a flood of connections must not flood the log too
            log.warning("ext_authz: %d connections refused at the cap of %d open (%d in all)",
                        self.refused - self._refused_logged, self.max_connections, self.refused)
            self._logged_at, self._refused_logged = now, self.refused

    def sweep(self, now: float) -> int:
        """Close the connections quiet since the sweep ``idle_timeout_s`` or more before ``now`` (monotonic
        seconds) with nothing buffered and no answer awaited; returns how many. A connection with a begun
        request is the read timeout's, one awaiting its answer nobody's (the answer is the picker's delay)."""
        closed = 0
        for conn in list(self.open):
            if conn.seen:
                conn.seen, conn.quiet_since = False, now
            elif not conn.busy and not conn.buf and now - conn.quiet_since >= self.idle_timeout_s:
                conn.close()
                self.open.discard(conn)  # closed now (its descriptor freed): the next sweep must not count it again
                closed += 1
        if closed:
            self.idle_closed += closed
            log.info("ext_authz: %d connections closed, idle %g s or more", closed, self.idle_timeout_s)
        return closed

    async def sweep_forever(self) -> None:
        """``sweep`` every ``idle_timeout_s / SWEEPS``, until cancelled."""
        while True:
            await asyncio.sleep(self.idle_timeout_s / self.SWEEPS)
            self.sweep(time.monotonic())


class OneByOne(Swept):
    """One connection: requests in, answers out in order. Envoy's HTTP/1.1 pool never pipelines; a client that
    does waits, its next request read only once the previous answer is written."""

    def __init__(self, answer: Answer, max_body: int = MAX_BODY_BYTES, unsent: Unsent | None = None,
                 read_timeout_s: float = READ_TIMEOUT_S, conns: Connections | None = None) -> None:
        self.answer = answer
        self.read_timeout_s = read_timeout_s
        self.stall: asyncio.TimerHandle | None = None  # armed while a begun request is not whole
        self.max_body = max_body
        self.unsent = unsent
        # a bytearray: a large body arrives in many reads, and bytes concatenation would copy it once per read
        self.buf = bytearray()
        self.busy = False  # an answer is being awaited
        self.paused = False  # reading stopped: a client pipelining behind an awaited answer has sent a full request
        self.unread = False  # the peer is not reading its answers (past the transport's high-water mark)
        # where the head of the request begun in ``buf`` ends and how many bytes the request needs, once that head
        # is read: a body trickling in is then one comparison a read, not its head searched and parsed again (1.5 ms
        # a read for a 60 KiB head)
        self.cut: tuple[int, int] | None = None
        self.transport: asyncio.Transport | None = None
        self.closing: asyncio.Transport | None = None  # closed by ``_close``, maybe still flushing answers
        self.conns = conns
        self.seen = True  # activity since the last idle sweep (read by ``Connections.sweep``)
        self.quiet_since = 0.0  # the sweep that last found it active

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        if self.conns is not None and not self.conns.admit(self):
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._drop_buffer()
        self._unwatch()
        if self.conns is not None:
            self.conns.open.discard(self)

    def close(self) -> None:
        """Close the connection now (``Connections``: it was idle too long), answers the peer has not read
        dropped: a peer that read nothing for that long is not reading, and a close that waited to flush them
        would hold the descriptor (and its place under the cap) for as long as the peer keeps its end open."""
        self._close()
        if self.closing is not None:
            self.closing.abort()

    def pause_writing(self) -> None:
        """The peer is not reading its answers: answer no more of its requests and stop reading them (TCP
        pushes back on it) instead of buffering answers without bound; a request left whole in the buffer
        meanwhile is on the read timeout's clock (the peer's delay)."""
        self.unread = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        """The peer read its answers: answer what it sent meanwhile, and read on."""
        self.unread = False
        if self.transport is None:
            return
        if not self.paused:
            self.transport.resume_reading()
        self._next()
        if self.buf:
            self._watch()
        elif self.stall is not None:
            self._unwatch()

    def data_received(self, data: bytes) -> None:
        self.seen = True
        if (conns := self.conns) is not None:
            if conns.held + len(data) > conns.max_held:
                # the listener's budget is spent: the connection whose bytes would pass it goes (one closed for
                # this rather than the process's memory), its partial request with it
                conns.over_held += 1
                log.warning("ext_authz: connection closed, %d bytes already held by all connections", conns.held)
                self._close()
                return
            conns.held += len(data)
        self.buf += data
        if self.busy and len(self.buf) > MAX_HEAD_BYTES + 4 + self.max_body and self.transport is not None:
            # Bytes pipelined behind an awaited answer are not read until it is written: past one request's
            # most, stop reading (TCP pushes back on the client) instead of buffering without bound.
            self.transport.pause_reading()
            self.paused = True
        self._next()
        if self.buf:  # (a check arrives whole: nothing is left and no timer is armed)
            self._watch()
        elif self.stall is not None:
            self._unwatch()

    def _watch(self) -> None:
        """A partial request is buffered: it must be whole within ``read_timeout_s`` (an answer being awaited
        is not the client's delay)."""
        if self.busy:
            self._unwatch()
        elif self.stall is None and self.transport is not None:
            self.stall = asyncio.get_running_loop().call_later(self.read_timeout_s, self._stalled)

    def _unwatch(self) -> None:
        if self.stall is not None:
            self.stall.cancel()
            self.stall = None

    def _stalled(self) -> None:
        self.stall = None
        if self.buf and not self.busy:
            log.info("ext_authz connection closed: a request still partial after %.0f s", self.read_timeout_s)
            self._close()

    def _next(self) -> None:
        while not self.busy and not self.unread and self.transport is not None:
            if self.cut is None:
                end = self.buf.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
                if end < 0:
                    if len(self.buf) > MAX_HEAD_BYTES:  # no end of head in sight: not a request this reads
                        self._close()
                    return
                length = content_length(self.buf[:end], self.max_body)
                if length < 0:  # the framing is unknown: nothing after this head can be cut into requests
                    self._close()
                    return
                self.cut = (end, end + 4 + length)
            end, need = self.cut
            if len(self.buf) < need:
                return  # the body is still coming
            self.cut = None
            head, body = bytes(self.buf[:end]), bytes(self.buf[end + 4:need])
            del self.buf[:need]
            if self.conns is not None:
                self.conns.held -= need
            if self.stall is not None:  # this request is whole: the next one's time starts when it begins
                self._unwatch()
            try:
                out = self.answer(head, body)
            except Exception:
                log.exception("ext_authz answer failed; connection closed")
                self._close()
                return
            if isinstance(out, bytes):
                self.transport.write(out)
            else:
                self.busy = True
                asyncio.ensure_future(out).add_done_callback(self._answered)

    def _answered(self, fut: asyncio.Future[bytes]) -> None:
        self.busy = False
        if fut.cancelled() or fut.exception() is not None:
            if not fut.cancelled():
                log.error("ext_authz answer failed; connection closed", exc_info=fut.exception())
            self._close()
            return
        if self.transport is not None and not self.transport.is_closing():
            self.seen = True  # its idle time starts when the answer leaves, as the peer's does
            self.transport.write(fut.result())
            if self.paused:
                self.paused = False
                if not self.unread:
                    self.transport.resume_reading()
            self._next()
            if self.buf:
                self._watch()
        elif self.unsent is not None:
            self.unsent(fut.result())

    def _drop_buffer(self) -> None:
        if self.conns is not None:
            self.conns.held -= len(self.buf)
        self.buf = bytearray()
        self.cut = None

    def _close(self) -> None:
        self._drop_buffer()
        self._unwatch()
        if self.transport is not None:
            self.closing = self.transport
            self.transport.close()
            self.transport = None
