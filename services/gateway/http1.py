"""Just enough HTTP/1.1 server framing for Envoy's ``ext_authz`` checks: an ``asyncio.Protocol`` (run on uvloop)
that cuts a kept-alive connection into requests (head, ``content-length`` body) and writes each answer in order.

Why not a framework: the picker's check is one small request per client request, and every microsecond of
Python on it is latency Envoy waits for (docs/gateway.md, "Cheaper hops to Python"). What Envoy sends is
narrow, so what this does not understand closes the connection rather than guessing at the framing: a head
past ``MAX_HEAD_BYTES``, a missing, negative, garbled, conflicting or too large ``content-length`` on a
request that has a body, or any ``transfer-encoding``. An answer that raises closes the connection too (the
check then fails on Envoy's side, and its failure mode decides), and so does a request that has begun but is not
whole ``READ_TIMEOUT_S`` later (a client sending a byte at a time would hold its connection and buffer for ever;
Envoy sends a check at once). An idle connection with nothing buffered stays open: Envoy pools them. Nothing
here crashes the server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import cast

log = logging.getLogger("gantry.gateway")

MAX_HEAD_BYTES = 64 << 10  # request line and headers; Envoy's own default limit is 60 KiB
MAX_BODY_BYTES = 32 << 20  # the largest body a check may carry (the picker refuses larger ones as 400 anyway)
MALFORMED = -1
READ_TIMEOUT_S = 30.0  # a begun request must be whole within this

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


def response(code: int, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A whole HTTP/1.1 response (kept alive)."""
    extra = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers)
    return b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\n%s\r\n%s" % (code, _REASONS.get(code, b"X"), len(body), extra,
                                                                  body)


_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 429: b"Too Many Requests",
            500: b"Internal Server Error", 503: b"Service Unavailable"}


class OneByOne(asyncio.Protocol):
    """One connection: requests in, answers out in order. Envoy's HTTP/1.1 pool never pipelines; a client that
    does waits, its next request read only once the previous answer is written."""

    def __init__(self, answer: Answer, max_body: int = MAX_BODY_BYTES, unsent: Unsent | None = None,
                 read_timeout_s: float = READ_TIMEOUT_S) -> None:
        self.answer = answer
        self.read_timeout_s = read_timeout_s
        self.stall: asyncio.TimerHandle | None = None  # armed while a begun request is not whole
        self.max_body = max_body
        self.unsent = unsent
        # a bytearray: a large body arrives in many reads, and bytes concatenation would copy it once per read
        self.buf = bytearray()
        self.busy = False  # an answer is being awaited
        self.paused = False  # reading stopped: a client pipelining behind an awaited answer has sent a full request
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.buf = bytearray()
        self._unwatch()

    def data_received(self, data: bytes) -> None:
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
        while not self.busy and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
            if end < 0:
                if len(self.buf) > MAX_HEAD_BYTES:  # no end of head in sight: not a request this reads
                    self._close()
                return
            length = content_length(self.buf[:end], self.max_body)
            if length < 0:  # the framing is unknown: nothing after this head can be cut into requests
                self._close()
                return
            need = end + 4 + length
            if len(self.buf) < need:
                return  # the body is still coming
            head, body = bytes(self.buf[:end]), bytes(self.buf[end + 4:need])
            del self.buf[:need]
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
            self.transport.write(fut.result())
            if self.paused:
                self.paused = False
                self.transport.resume_reading()
            self._next()
            if self.buf:
                self._watch()
        elif self.unsent is not None:
            self.unsent(fut.result())

    def _close(self) -> None:
        self.buf = bytearray()
        self._unwatch()
        if self.transport is not None:
            self.transport.close()
            self.transport = None
