"""The picker's own gRPC server: HTTP/2 on the picker's event loop, for the few methods Envoy calls
(ext_proc's ``Process``, the health check).

Why not grpcio: a grpcio asyncio server costs ~1.5 ms of CPU and adds ~1.5 ms p50 per ext_proc exchange on
this kind of host doing nothing at all (``bench/gateway.py --floor``, docs/gateway.md): each message crosses
grpc core's threads, its poller and the event loop. Here a message costs one ``data_received`` turn: frames
parsed, the method's async iterator fed, its answer written in the same turn when it is ready.

Scope: gRPC over HTTP/2 (RFC 7540) as a server, no server push, no compression (a compressed message is
refused), no trailers from the peer beyond ending its side. Limits a stranger cannot talk past: at most
``MAX_STREAMS`` concurrent calls (more are refused with REFUSED_STREAM), messages up to ``max_message``
bytes, header blocks up to ``MAX_HEADER_BLOCK``, every peer byte inside the flow-control windows it was
granted and at most ``MAX_BUFFERED`` bytes held per connection (whole or partial messages), a handler's
answers written only as fast as the peer takes them (it is not asked for the next one before), a frame
begun must end within ``READ_TIMEOUT_S``. A connection is sent GOAWAY and closed when it has more than
``MAX_RESETS`` calls a second reset (by itself, or by us for its errors: HTTP/2 rapid reset and its
"made you reset" variant), asks for more than ``MAX_CONTROL`` PING/SETTINGS answers a second, or keeps asking
for them while not reading. Every frame costs work bounded by its own size (no walk over every stream). Idle
connections and the cap on connections are ``http1.Connections``' (the same sweep and accounting as the
HTTP/1.1 listener)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Final, cast

import hpack

from services.gateway import h2frames as f
from services.gateway.h2stream import Budget, CallError, Handler, Stream, wake
from services.gateway.http1 import Connections, Swept
from shared.host.throttle import PerKeyThrottle

log = logging.getLogger("gantry.gateway")

MAX_STREAMS: Final = 4096  # concurrent calls per connection (Envoy opens another connection beyond)
MAX_HEADER_BLOCK: Final = 16 << 10  # a call's header block, compressed (Envoy's are ~100 bytes)
MAX_FRAME: Final = 1 << 20  # the largest frame the peer may send us (fewer frames for a large request body)
CONNECTION_WINDOW: Final = 1 << 30  # bytes in flight to us on a connection, replenished as they arrive
MAX_BUFFERED: Final = 256 << 20  # bytes of unread messages on one connection before it is called abusive
MAX_RESETS: Final = 2000  # calls per second a connection may have reset (rapid reset guard)
MAX_CONTROL: Final = 1000  # PING and SETTINGS frames per second a connection may send
MAX_UNREAD_CONTROL: Final = 64  # control answers owed to a peer not reading, before it is dropped
MAX_SETTINGS: Final = 32  # entries in one SETTINGS frame (RFC 7540 defines 6)
MAX_WINDOW_CHANGES: Final = 10  # increases of the peer's initial window per second
READ_TIMEOUT_S: Final = 30.0  # a frame (or the preface) begun must be whole within this, unless frames progress
ERROR_LOG_EVERY_S: Final = 10.0
MESSAGE_COST: Final = 64
"""Bytes a message not yet taken is counted for beyond its own (its object and queue slot): a flood of tiny
messages must reach the connection's bound as its memory does."""


class H2Connection(Swept):
    """One HTTP/2 connection from Envoy (or any gRPC client) to the picker's methods (path → ``Handler``)."""

    def __init__(self, methods: dict[str, Handler], conns: Connections, max_message: int) -> None:
        self.methods = methods
        self.conns = conns
        self.max_message = max_message
        # one whole message always fits: a message is granted back only once taken, so the window is topped up
        # whenever less than a whole one is left (``_taken``)
        self.stream_window = max_message + 5 + 1024
        self.transport: asyncio.Transport | None = None
        self.closing: asyncio.Transport | None = None
        self.buf = bytearray()  # read, not yet a whole frame (``Connections.sweep`` reads it too)
        self.seen = True  # activity since the last idle sweep
        self.quiet_since = 0.0
        self.streams: dict[int, Stream] = {}
        self.busy = False  # a call is open: not idle (``Connections.sweep``), whatever the time
        self.last_id = 0  # the highest stream id the peer opened
        self.preface = False
        self.decoder = hpack.Decoder()
        self.decoder.max_header_list_size = MAX_HEADER_BLOCK * 4
        self.continuing: tuple[int, int, bytearray] | None = None  # stream, flags, header block so far
        self.peer_window = f.DEFAULT_WINDOW  # the peer's initial stream window (its SETTINGS)
        self.peer_frame = f.DEFAULT_FRAME
        self.send_window = f.DEFAULT_WINDOW  # connection-level, toward the peer
        self.recv_window = CONNECTION_WINDOW
        self.recv_unacked = 0
        self._buffered = 0  # bytes of messages (whole or partial) received and not yet taken, every stream
        self._counted = True  # its bytes count in the listener's (until it closes)
        # streams with answers waiting for window, in order: for the connection's, for their own (dicts as ordered
        # sets: a connection WINDOW_UPDATE serves the first ones until the window is spent, never walks them all)
        self.conn_blocked: dict[int, None] = {}
        self.stream_blocked: dict[int, None] = {}
        self.going = False  # GOAWAY sent or received: no new calls
        self.unread = False  # the peer is not reading what we write
        self.owed = 0  # control answers written while it was not reading
        self.resets = Budget(MAX_RESETS)
        self.controls = Budget(MAX_CONTROL)
        self.window_changes = Budget(MAX_WINDOW_CHANGES)
        self.stall: asyncio.TimerHandle | None = None  # armed while a frame is partly read
        self.frames = 0  # frames read (a stalled read is one that made no progress)

    @property
    def buffered(self) -> int:
        """Bytes of messages (whole or partial) received and not yet taken, every stream; counted in the
        listener's too (``Connections.held``) while the connection is open."""
        return self._buffered

    @buffered.setter
    def buffered(self, n: int) -> None:
        if self._counted:
            self.conns.held += n - self._buffered
        self._buffered = n

    def _let_go(self) -> None:
        """The connection is closing: what it held no longer counts in the listener's (once)."""
        if self._counted:
            self.conns.held -= self._buffered
            self._counted = False

    def _too_much_held(self) -> bool:
        """This connection's unread bytes past its bound, or the listener's past its budget (a thousand peers
        each under its own bound could otherwise hold hundreds of GiB)."""
        return self._buffered > MAX_BUFFERED or self.conns.held > self.conns.max_held

    # --- transport events -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tr = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        if not self.conns.admit(self):
            self._abort()
            return
        tr.write(f.settings({
            f.MAX_CONCURRENT_STREAMS: MAX_STREAMS, f.INITIAL_WINDOW_SIZE: self.stream_window,
            f.MAX_FRAME_SIZE: MAX_FRAME, f.MAX_HEADER_LIST_SIZE: MAX_HEADER_BLOCK * 4, f.ENABLE_PUSH: 0})
            + f.window_update(0, CONNECTION_WINDOW - f.DEFAULT_WINDOW))

    def connection_lost(self, exc: Exception | None) -> None:
        self._let_go()
        self.transport = None
        self.conns.open.discard(self)
        for st in list(self.streams.values()):
            if st.task is not None:
                st.task.cancel()
        self.streams.clear()
        self.conn_blocked.clear()
        self.stream_blocked.clear()
        self.busy = False
        self.buf = bytearray()
        if self.stall is not None:
            self.stall.cancel()
            self.stall = None

    def pause_writing(self) -> None:
        """The peer is not reading: handlers wait before their next answer (``_call``), and nothing more is read
        from it (every frame could owe it an answer: a refusal, a reset, a PING's) until it reads."""
        self.unread = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        """The peer read: handlers whose answers are all out go on."""
        self.unread, self.owed = False, 0
        if self.transport is not None:
            self.transport.resume_reading()
        for st in list(self.streams.values()):
            if not st.pending:
                wake(st)

    def close(self) -> None:
        """Close now (``Connections``: idle too long): GOAWAY first, so a call the peer is sending meanwhile is
        known unprocessed (the peer may send it again)."""
        self._goaway(f.NO_ERROR, b"idle")

    def data_received(self, data: bytes) -> None:
        self.seen = True
        self.buf += data
        if not self.preface:
            if len(self.buf) < len(f.PREFACE):
                if not f.PREFACE.startswith(bytes(self.buf)):
                    self._abort()
                elif self.stall is None:
                    self.stall = asyncio.get_running_loop().call_later(READ_TIMEOUT_S, self._stalled, -1)
                return
            if not self.buf.startswith(f.PREFACE):
                self._abort()
                return
            del self.buf[:len(f.PREFACE)]
            self.preface = True
        self._read_frames()
        if self.buf and self.stall is None and self.transport is not None:
            self.stall = asyncio.get_running_loop().call_later(READ_TIMEOUT_S, self._stalled, self.frames)
        elif not self.buf and self.stall is not None:
            self.stall.cancel()
            self.stall = None

    def _stalled(self, frames_then: int) -> None:
        """A frame has been partly read for ``READ_TIMEOUT_S``: closed, unless whole frames came meanwhile (a
        large body arriving slowly)."""
        self.stall = None
        if not self.buf or self.transport is None:
            return
        if self.frames > frames_then:
            self.stall = asyncio.get_running_loop().call_later(READ_TIMEOUT_S, self._stalled, self.frames)
            return
        self._goaway(f.PROTOCOL_ERROR, b"a frame left partial")

    def _read_frames(self) -> None:
        buf = self.buf
        while len(buf) >= 9 and self.transport is not None:
            size = int.from_bytes(buf[:3], "big")
            if size > MAX_FRAME:
                self._goaway(f.FRAME_SIZE_ERROR, b"frame too large")
                return
            if len(buf) < 9 + size:
                return
            self.frames += 1
            kind, flags = buf[3], buf[4]
            sid = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            payload = bytes(buf[9:9 + size])
            del buf[:9 + size]
            try:
                self._frame(kind, flags, sid, payload)
            except _ConnectionError as err:
                self._goaway(err.code, err.debug)
                return

    # --- frames -----------------------------------------------------------------------------------------

    def _frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if self.continuing is not None and kind != f.CONTINUATION:
            raise _ConnectionError(f.PROTOCOL_ERROR, b"header block interrupted")
        if kind == f.DATA:
            self._data(flags, sid, payload)
        elif kind == f.HEADERS:
            self._headers(flags, sid, payload)
        elif kind == f.CONTINUATION:
            self._continuation(flags, sid, payload)
        elif kind == f.RST_STREAM:
            self._rst(sid, payload)
        elif kind == f.SETTINGS:
            self._settings(flags, sid, payload)
        elif kind == f.PING:
            if sid != 0 or len(payload) != 8:
                raise _ConnectionError(f.PROTOCOL_ERROR if sid else f.FRAME_SIZE_ERROR, b"bad PING")
            if not self.controls.take():
                raise _ConnectionError(f.ENHANCE_YOUR_CALM, b"too many PING frames")
            if not flags & f.ACK:
                self._control(f.frame(f.PING, f.ACK, 0, payload))
        elif kind == f.WINDOW_UPDATE:
            self._window_update(sid, payload)
        elif kind == f.GOAWAY:
            if sid != 0:
                raise _ConnectionError(f.PROTOCOL_ERROR, b"GOAWAY on a stream")
            self.going = True
            if not self.streams:
                self._goaway(f.NO_ERROR, b"")
        elif kind == f.PUSH_PROMISE:
            raise _ConnectionError(f.PROTOCOL_ERROR, b"push from a client")
        elif kind == f.PRIORITY and sid == 0:
            raise _ConnectionError(f.PROTOCOL_ERROR, b"PRIORITY on stream 0")
        # PRIORITY on a stream, and frame types we do not know, are ignored (RFC 7540 §4.1, §5.3)

    def _settings(self, flags: int, sid: int, payload: bytes) -> None:
        if sid != 0:
            raise _ConnectionError(f.PROTOCOL_ERROR, b"SETTINGS on a stream")
        if flags & f.ACK:
            if payload:
                raise _ConnectionError(f.FRAME_SIZE_ERROR, b"SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise _ConnectionError(f.FRAME_SIZE_ERROR, b"SETTINGS length")
        if len(payload) > 6 * MAX_SETTINGS or not self.controls.take():
            raise _ConnectionError(f.ENHANCE_YOUR_CALM, b"too many settings")
        window = self.peer_window
        for at in range(0, len(payload), 6):
            key, value = int.from_bytes(payload[at:at + 2], "big"), int.from_bytes(payload[at + 2:at + 6], "big")
            if key == f.INITIAL_WINDOW_SIZE:
                if value > f.MAX_WINDOW:
                    raise _ConnectionError(f.FLOW_CONTROL_ERROR, b"initial window too large")
                window = value  # applied once, the last one given
            elif key == f.MAX_FRAME_SIZE:
                if not f.DEFAULT_FRAME <= value <= f.MAX_FRAME_LIMIT:
                    raise _ConnectionError(f.PROTOCOL_ERROR, b"bad MAX_FRAME_SIZE")
                self.peer_frame = value
            elif key == f.ENABLE_PUSH and value > 1:
                raise _ConnectionError(f.PROTOCOL_ERROR, b"bad ENABLE_PUSH")
        grew, self.peer_window = window > self.peer_window, window  # every stream's window moves with it
        self._control(f.frame(f.SETTINGS, f.ACK, 0))
        if grew:
            if not self.window_changes.take():  # each walks the waiting streams: a peer sets it once, not often
                raise _ConnectionError(f.ENHANCE_YOUR_CALM, b"initial window changed too often")
            self._flush_stream_blocked()

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(f.FRAME_SIZE_ERROR, b"WINDOW_UPDATE length")
        inc = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if sid == 0:
            if inc == 0:
                raise _ConnectionError(f.PROTOCOL_ERROR, b"zero window increment")
            self.send_window += inc
            if self.send_window > f.MAX_WINDOW:
                raise _ConnectionError(f.FLOW_CONTROL_ERROR, b"connection window overflow")
            self._flush_conn_blocked()
            return
        st = self.streams.get(sid)
        if st is None:
            if sid > self.last_id:
                raise _ConnectionError(f.PROTOCOL_ERROR, b"WINDOW_UPDATE on an idle stream")
            return  # a stream we closed: it may still be in flight
        if inc == 0:
            self._fail(st, f.GRPC_INTERNAL, "zero window increment", f.PROTOCOL_ERROR)
            return
        st.send_credit += inc
        if self.peer_window + st.send_credit > f.MAX_WINDOW:
            self._fail(st, f.GRPC_INTERNAL, "stream window overflow", f.FLOW_CONTROL_ERROR)
            return
        self._flush(st)

    def _rst(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ConnectionError(f.FRAME_SIZE_ERROR, b"RST_STREAM length")
        if sid == 0:
            raise _ConnectionError(f.PROTOCOL_ERROR, b"RST_STREAM on stream 0")
        if sid > self.last_id:
            raise _ConnectionError(f.PROTOCOL_ERROR, b"RST_STREAM on an idle stream")
        st = self.streams.pop(sid, None)
        if st is None:
            return
        self._forget(st)
        if st.task is not None:
            st.task.cancel()  # the handler's own cleanup runs (its finally), nothing more is written
        self._unblock(sid)
        # only a call reset before any answer counts (rapid reset): Envoy ends every ext_proc stream it is done
        # with by END_STREAM and then a reset, after the picker's answers
        if not st.headers_sent and not self.resets.take():
            raise _ConnectionError(f.ENHANCE_YOUR_CALM, b"too many resets")
        self._idle_check()

    def _headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise _ConnectionError(f.PROTOCOL_ERROR, b"HEADERS on stream 0")
        at, end = 0, len(payload)
        if flags & f.PADDED:
            if not payload:
                raise _ConnectionError(f.PROTOCOL_ERROR, b"padding")
            at, end = 1, len(payload) - payload[0]
        if flags & f.PRIORITY_FLAG:
            at += 5
        if end < at:
            raise _ConnectionError(f.PROTOCOL_ERROR, b"padding longer than the frame")
        block = bytearray(payload[at:end])
        if flags & f.END_HEADERS:
            self._header_block(flags, sid, block)
        else:
            self.continuing = (sid, flags, block)

    def _continuation(self, flags: int, sid: int, payload: bytes) -> None:
        if self.continuing is None or self.continuing[0] != sid:
            raise _ConnectionError(f.PROTOCOL_ERROR, b"CONTINUATION out of place")
        block = self.continuing[2]
        block += payload
        if len(block) > MAX_HEADER_BLOCK:
            raise _ConnectionError(f.ENHANCE_YOUR_CALM, b"header block too large")
        if flags & f.END_HEADERS:
            first_flags = self.continuing[1]
            self.continuing = None
            self._header_block(first_flags, sid, block)

    def _header_block(self, flags: int, sid: int, block: bytearray) -> None:
        if len(block) > MAX_HEADER_BLOCK:
            raise _ConnectionError(f.ENHANCE_YOUR_CALM, b"header block too large")
        try:  # always decoded, even for a call refused: the decoder's table must follow the peer's
            fields = self.decoder.decode(bytes(block), raw=True)
        except hpack.HPACKError as err:
            raise _ConnectionError(f.COMPRESSION_ERROR, str(err).encode()[:64]) from None
        st = self.streams.get(sid)
        if st is not None:  # trailers: only the end of the peer's side
            if not flags & f.END_STREAM:
                raise _ConnectionError(f.PROTOCOL_ERROR, b"trailers without END_STREAM")
            self._remote_end(st)
            return
        if sid <= self.last_id:
            return  # a stream already closed (we ended it while the peer was still sending)
        if sid % 2 == 0:
            raise _ConnectionError(f.PROTOCOL_ERROR, b"even stream id from a client")
        self.last_id = sid
        if self.going:
            return  # after our GOAWAY: not processed (the peer knows from its last stream id)
        if len(self.streams) >= MAX_STREAMS:
            self._control(f.rst_stream(sid, f.REFUSED_STREAM))
            return
        st = Stream(sid, self.stream_window, functools.partial(self._taken, sid))
        self.streams[sid] = st
        self.busy = True
        handler, refusal = self._route(dict(fields))
        if handler is None:
            st.remote_done = bool(flags & f.END_STREAM)
            self._refuse(st, refusal)
            return
        if flags & f.END_STREAM:
            self._remote_end(st)
        st.task = asyncio.get_running_loop().create_task(self._call(st, handler))

    def _route(self, fields: dict[bytes, bytes]) -> tuple[Handler | None, str]:
        if fields.get(b":method") != b"POST":
            return None, "a gRPC call is a POST"
        handler = self.methods.get(fields.get(b":path", b"").decode("latin-1"))
        if handler is None:
            return None, f"no method {fields.get(b':path', b'')[:128]!r}"
        if not fields.get(b"content-type", b"").startswith(b"application/grpc"):
            return None, "not a gRPC content type"
        if fields.get(b"grpc-encoding", b"identity") != b"identity":
            return None, "compressed calls are not accepted"
        return handler, ""

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise _ConnectionError(f.PROTOCOL_ERROR, b"DATA on stream 0")
        self.recv_window -= len(payload)
        if self.recv_window < 0:
            raise _ConnectionError(f.FLOW_CONTROL_ERROR, b"connection window exceeded")
        self.recv_unacked += len(payload)
        if self.recv_unacked >= CONNECTION_WINDOW // 2:  # granted back as it arrives; MAX_BUFFERED bounds memory
            self._control(f.window_update(0, self.recv_unacked))
            self.recv_window += self.recv_unacked
            self.recv_unacked = 0
        st = self.streams.get(sid)
        if st is None:
            if sid > self.last_id:
                raise _ConnectionError(f.PROTOCOL_ERROR, b"DATA on an idle stream")
            return  # a stream we ended: the peer had sent this before it knew
        if st.remote_done:
            self._fail(st, f.GRPC_INTERNAL, "data after the end of the call", f.STREAM_CLOSED)
            return
        st.recv_window -= len(payload)
        if st.recv_window < 0:
            self._fail(st, f.GRPC_INTERNAL, "stream window exceeded", f.FLOW_CONTROL_ERROR)
            return
        data = payload
        if flags & f.PADDED:
            if not payload or payload[0] >= len(payload):
                raise _ConnectionError(f.PROTOCOL_ERROR, b"padding")
            data = payload[1:len(payload) - payload[0]]
            self._grant(st, len(payload) - len(data))  # padding holds nothing: its window is free at once
        self._messages(st, data)
        if flags & f.END_STREAM and sid in self.streams:
            self._remote_end(st)

    def _messages(self, st: Stream, data: bytes) -> None:
        """Cut ``data`` (after what came before on the stream) into messages for the handler."""
        part = st.partial
        part += data
        self.buffered += len(data)  # held until taken (or the call ends), whole or not
        if self._too_much_held():
            raise _ConnectionError(f.ENHANCE_YOUR_CALM, b"too many unread bytes")
        while len(part) >= 5:
            if part[0] != 0:
                self._fail(st, f.GRPC_INTERNAL, "compressed message without an encoding", f.NO_ERROR)
                return
            size = int.from_bytes(part[1:5], "big")
            if size > self.max_message:
                self._fail(st, f.GRPC_RESOURCE_EXHAUSTED,
                           f"message of {size} bytes, more than {self.max_message}", f.NO_ERROR)
                return
            if len(part) < 5 + size:
                return
            msg = bytes(part[5:5 + size])
            del part[:5 + size]
            self.buffered += MESSAGE_COST  # what holding it costs beyond its bytes (a flood of tiny messages)
            if self._too_much_held():
                raise _ConnectionError(f.ENHANCE_YOUR_CALM, b"too many unread bytes")
            st.inbox.put(msg)

    def _remote_end(self, st: Stream) -> None:
        st.remote_done = True
        if st.partial:
            self._fail(st, f.GRPC_INTERNAL, "call ended inside a message", f.NO_ERROR)
            return
        st.inbox.end()

    def _taken(self, sid: int, n: int) -> None:
        """The handler of ``sid`` took a message of ``n`` framed bytes: grant them back to the peer."""
        self.buffered -= n + MESSAGE_COST
        st = self.streams.get(sid)
        if st is not None:
            self._grant(st, n)

    def _grant(self, st: Stream, n: int) -> None:
        """``n`` more bytes of ``st``'s window are free: granted back once half the window is, or sooner when less
        than a whole message would fit."""
        if st.remote_done:
            return
        st.unacked += n
        if st.unacked >= self.stream_window // 2 or st.recv_window < self.max_message + 5:
            st.recv_window += st.unacked
            self._write(f.window_update(st.id, st.unacked))
            st.unacked = 0

    # --- calls ------------------------------------------------------------------------------------------

    async def _call(self, st: Stream, handler: Handler) -> None:
        status, text = f.GRPC_OK, ""
        try:
            async for out in handler(st.inbox):
                self._send(st, f.message(out))
                if st.pending or self.unread:  # the peer has not taken the last answer: no next one yet
                    await self._drained(st)
        except CallError as err:
            status, text = err.status, err.message
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                self._drop(st)
                raise  # reset by the peer or the connection lost: nothing more to write
            log.error("gRPC call on stream %d: its handler raised CancelledError uncancelled", st.id)
            status, text = f.GRPC_INTERNAL, "the picker failed on this call"
        except Exception:
            log.exception("gRPC call on stream %d failed", st.id)
            status, text = f.GRPC_INTERNAL, "the picker failed on this call"
        self._end(st, status, text)

    async def _drained(self, st: Stream) -> None:
        """Until ``st``'s answers have all left and the peer is reading."""
        while (st.pending or self.unread) and self.transport is not None and self.streams.get(st.id) is st:
            st.drained = asyncio.get_running_loop().create_future()
            try:
                await st.drained
            finally:
                st.drained = None

    def _drop(self, st: Stream) -> None:
        """Forget ``st`` if it is still held (its handler is gone)."""
        if self.streams.get(st.id) is st:
            self.streams.pop(st.id)
            self._unblock(st.id)
            self._forget(st)
            self._idle_check()

    def _send(self, st: Stream, payload: bytes) -> None:
        st.pending += payload
        self._flush(st)

    def _end(self, st: Stream, status: int, text: str) -> None:
        """The handler is done: trailers after whatever is still waiting for window."""
        st.trailers = f.trailers(status, text, only=not st.headers_sent and not st.pending)
        self._flush(st)

    def _refuse(self, st: Stream, why: str) -> None:
        self._end(st, f.GRPC_UNIMPLEMENTED, why)

    def _fail(self, st: Stream, status: int, why: str, rst_code: int) -> None:
        """End a call the peer broke: its handler cancelled, the status sent when nothing was yet, then reset."""
        if st.task is not None:
            st.task.cancel()
            st.task = None
        st.pending.clear()
        if not st.headers_sent:
            self._write(f.frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, st.id, f.trailers(status, why, only=True)))
        self._write(f.rst_stream(st.id, rst_code))
        self.streams.pop(st.id, None)
        self._unblock(st.id)
        self._forget(st)
        self._idle_check()
        if not self.resets.take():  # a peer making us reset its calls is resetting them too
            raise _ConnectionError(f.ENHANCE_YOUR_CALM, b"too many calls reset for errors")

    def _forget(self, st: Stream) -> None:
        """A stream's unread bytes no longer count against the connection."""
        count, framed = st.inbox.drop()
        self.buffered -= framed + count * MESSAGE_COST + len(st.partial)
        st.partial.clear()

    def _flush(self, st: Stream) -> None:
        """Write what the windows allow of ``st``'s waiting data, and its trailers once that is all out."""
        if self.transport is None:
            return
        out = []
        if not st.headers_sent and (st.pending or st.trailers is not None):
            st.headers_sent = True
            if st.trailers is not None and not st.pending:  # trailers only: one block ends the call
                out.append(f.frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, st.id, st.trailers))
                self._write(b"".join(out))
                self._closed(st)
                return
            out.append(f.frame(f.HEADERS, f.END_HEADERS, st.id, f.RESPONSE_HEADERS))
        while st.pending:
            n = min(len(st.pending), self.peer_window + st.send_credit, self.send_window, self.peer_frame)
            if n <= 0:
                break
            out.append(f.frame(f.DATA, 0, st.id, bytes(st.pending[:n])))
            del st.pending[:n]
            st.send_credit -= n
            self.send_window -= n
        self._unblock(st.id)
        if st.pending:  # out of window: the connection's if it is spent, else the stream's own
            (self.conn_blocked if self.send_window <= 0 else self.stream_blocked)[st.id] = None
        elif not self.unread:
            wake(st)
        done = st.trailers is not None and not st.pending
        if done:
            assert st.trailers is not None
            out.append(f.frame(f.HEADERS, f.END_HEADERS | f.END_STREAM, st.id, st.trailers))
        if out:
            self._write(b"".join(out))
        if done:
            self._closed(st)

    def _unblock(self, sid: int) -> None:
        self.conn_blocked.pop(sid, None)
        self.stream_blocked.pop(sid, None)

    def _flush_conn_blocked(self) -> None:
        """The connection's window grew: the streams waiting for it, first come first served, until it is spent
        again (work bounded by what the window lets out, not by how many streams wait)."""
        while self.send_window > 0 and self.conn_blocked:
            sid = next(iter(self.conn_blocked))
            st = self.streams.get(sid)
            if st is None:
                del self.conn_blocked[sid]
            else:
                self._flush(st)  # re-queued at the end if still waiting

    def _flush_stream_blocked(self) -> None:
        """The peer's initial window grew (SETTINGS, budgeted): every stream waiting on its own window."""
        for sid in list(self.stream_blocked):
            st = self.streams.get(sid)
            if st is None:
                self.stream_blocked.pop(sid, None)
            else:
                self._flush(st)

    def _closed(self, st: Stream) -> None:
        """Our side is done: a peer still sending is told to stop (gRPC's way: RST_STREAM NO_ERROR)."""
        if not st.remote_done:
            self._write(f.rst_stream(st.id, f.NO_ERROR))
        self.streams.pop(st.id, None)
        self._unblock(st.id)
        self._forget(st)
        self._idle_check()

    def _idle_check(self) -> None:
        """After a stream ended: the connection is idle when none is left (and closes if it is going)."""
        self.busy = bool(self.streams)
        self.seen = True  # its idle time starts when its last call ends
        if not self.streams and self.going:
            self._goaway(f.NO_ERROR, b"")

    # --- writing ----------------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _control(self, data: bytes) -> None:
        """An answer the protocol owes the peer (PING and SETTINGS acknowledgements, refusals): a peer that
        asks for them without reading what is written is abusive, not slow."""
        if self.unread:
            self.owed += 1
            if self.owed > MAX_UNREAD_CONTROL:
                raise _ConnectionError(f.ENHANCE_YOUR_CALM, b"not reading")
        self._write(data)

    def _goaway(self, code: int, debug: bytes) -> None:
        self.going = True
        if self.transport is not None:
            self.transport.write(f.goaway(self.last_id, code, debug))
            if code != f.NO_ERROR:
                _error_log.closed(code, debug)
        self._close()

    def _close(self) -> None:
        """Close, the calls cancelled: flushing what is written first, unless the peer is not reading (a close that
        waited for it would hold the connection, its calls and its place under the cap as long as it likes)."""
        self._let_go()
        if self.transport is not None:
            self.closing = self.transport
            if self.unread:
                self.transport.abort()
            else:
                self.transport.close()
            self.transport = None
        for st in list(self.streams.values()):
            if st.task is not None:
                st.task.cancel()

    def _abort(self) -> None:
        self._let_go()
        if self.transport is not None:
            self.transport.abort()
            self.transport = None


class _ErrorLog:
    """Connections closed for a protocol error: logged at most every ``ERROR_LOG_EVERY_S`` per kind of error (a
    peer sending junk in a loop must not flood the log), each line with how many closes since the last line."""

    def __init__(self) -> None:
        self.count = self.logged = 0
        self.throttle = PerKeyThrottle(ERROR_LOG_EVERY_S)

    def closed(self, code: int, debug: bytes) -> None:
        self.count += 1
        if self.throttle.allow(str(code), time.monotonic()):
            log.warning("gRPC connection closed: %s (HTTP/2 error %d; %d such closes since the last line)",
                        debug.decode(errors="replace"), code, self.count - self.logged)
            self.logged = self.count


_error_log = _ErrorLog()


class _ConnectionError(Exception):
    """A connection-level protocol error: GOAWAY with ``code``, then close."""

    def __init__(self, code: int, debug: bytes) -> None:
        super().__init__(debug)
        self.code = code
        self.debug = debug
