"""Server-sent-event streams of OpenAI chunks, written straight to the connection.

A token's chunk is a fixed per-request frame around the token's pre-escaped JSON text, so streaming a token
costs a dict lookup, one bytes formatting and one ``transport.write``. The HTTP server (uvicorn with the
engine server's intake on httptools or h11, ``services.engine_server.server``) puts each connection's
transport in the ASGI scope under :data:`TRANSPORT_KEY`; the response sends its headers through ASGI (so the
server frames the body as HTTP/1.1 chunked), writes the token chunks itself in the same chunked framing, and
ends through ASGI again (the server writes the last chunk and can reuse the connection). Under any other server
(no transport in the scope, or HTTP/1.0) the same frames go through ASGI ``send``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from services.engine_server.writer import Conn, SocketWriter
from shared.core.engine import Request

TRANSPORT_KEY = "gantry.transport"
"""ASGI scope extension holding the connection's asyncio transport."""

_DONE = b"data: [DONE]\n\n"
_join = b"".join
_compact = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps(..., separators=...) builds an encoder per call


def usage(req: Request, completion: int) -> dict[str, Any]:
    """OpenAI ``usage`` of a request that produced ``completion`` visible tokens."""
    return {"prompt_tokens": req.prompt_len, "completion_tokens": completion,
            "total_tokens": req.prompt_len + completion,
            "prompt_tokens_details": {"cached_tokens": max(req.num_cached_tokens, 0)}}


class SseSink:
    """One streamed request: encodes its tokens as OpenAI chunks and writes them out (a TokenSink)."""

    __slots__ = ("_conn", "_event", "_fast", "_fixed", "_framed", "_frames", "_head", "_pending", "_tail", "_tail_crlf",
                 "_transport", "chat", "created", "done", "eos", "include_usage", "kind", "model", "pieces",
                 "produced", "rid")

    def __init__(self, rid: str, model: str, created: int, chat: bool, include_usage: bool,
                 pieces: Callable[[int], bytes], eos: int, table: Mapping[int, bytes] | None = None) -> None:
        self.rid, self.model, self.created, self.chat = rid, model, created, chat
        self.include_usage = include_usage
        self.kind = kind_of(chat)
        self.pieces = pieces
        self.eos = eos
        self.produced = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._transport: asyncio.WriteTransport | None = None
        self._conn: Conn | None = None
        self._pending: list[tuple[Conn, bytes, bool]] = []
        self._fast: list[tuple[int, bytes, Conn]] = []
        self._frames: list[bytes] = []
        self._event: asyncio.Event | None = None
        head = _compact({"id": rid, "object": self.kind, "created": created, "model": model})[:-1].encode()
        if chat:
            pre, post = head + b',"choices":[{"index":0,"delta":{"content":', b'},"logprobs":null,'
        else:
            pre, post = head + b',"choices":[{"index":0,"text":', b',"logprobs":null,'
        post += b'"finish_reason":null}]' + (b',"usage":null}' if include_usage else b"}")
        self._head = b"data: " + pre
        self._tail = post + b"\n\n"
        self._fixed = len(self._head) + len(self._tail)  # a token's frame is this plus its text
        self._tail_crlf = self._tail + b"\r\n"
        # a token's chunk is (size line, text + tail) from a table shared by the sinks of one text model with
        # the same frame sizes, around this sink's head: one dict lookup (in C) and two concatenations per
        # token; ``pieces`` only for tokens outside ``table``
        self._framed = _framed_table(table, eos, self._fixed, self._tail_crlf).get
        if chat:
            self._write(self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                      "finish_reason": None}]))

    # -- TokenSink ------------------------------------------------------------------------------------
    def token(self, token_id: int) -> bool:
        """Stream one token (EOS is not text); False once the client has gone."""
        conn = self._conn
        if conn is not None:
            if conn.dead:
                return False
            framed = self._framed(token_id)
            if framed is None:
                if token_id == self.eos:
                    return True
                framed = self._frame(token_id)
            self.produced += 1
            data = _join((framed[0], self._head, framed[1]))  # one copy; ``a + b + c`` makes two
            if conn.backlog:
                self._pending.append((conn, data, False))  # behind its backlog, the careful way
            else:
                self._fast.append((conn.fd, data, conn))
            return True
        t = self._transport
        if t is not None and t.is_closing():
            return False
        if token_id != self.eos:
            self.produced += 1
            frame = self._head + self.pieces(token_id) + self._tail
            if t is not None:
                t.write(b"%x\r\n%b\r\n" % (len(frame), frame))
            else:
                self._write(frame)
        return True

    def finish(self, req: Request, reason: str, stop_reason: int | None) -> None:
        """The final chunk (finish reason), the usage chunk if asked, ``[DONE]``."""
        final: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
        if stop_reason is not None:
            final["stop_reason"] = stop_reason
        if self.chat:
            final["delta"] = {}
        else:
            final["text"] = ""
        frames = self._chunk([final])
        if self.include_usage:
            frames += self._chunk([], usage(req, self.produced))
        conn = self._conn
        if conn is not None:
            data = frames + _DONE
            self._pending.append((conn, b"%x\r\n%b\r\n" % (len(data), data), True))
            if not self.done.done():
                self.done.set_result(None)
            return
        t = self._transport
        if t is None or not t.is_closing():
            self._write(frames + _DONE)
        if not self.done.done():
            self.done.set_result(None)

    # -- plumbing -------------------------------------------------------------------------------------
    def _frame(self, token_id: int) -> tuple[bytes, bytes]:
        """A token outside the table: its HTTP chunk around the head (chunk-size line, text + tail)."""
        piece = self.pieces(token_id)
        return b"%x\r\n" % (self._fixed + len(piece)), piece + self._tail_crlf

    def _chunk(self, choices: list[dict[str, Any]], use: dict[str, Any] | None = None) -> bytes:
        body: dict[str, Any] = {"id": self.rid, "object": self.kind, "created": self.created, "model": self.model,
                                "choices": choices}
        if self.include_usage:
            body["usage"] = use
        return b"data: " + _compact(body).encode() + b"\n\n"

    def _write(self, data: bytes) -> None:
        t = self._transport
        if t is not None:
            t.write(b"%x\r\n%b\r\n" % (len(data), data))
            return
        self._frames.append(data)
        if self._event is not None:
            self._event.set()

    def attach_writer(self, conn: Conn, writer: SocketWriter) -> None:
        """Hand chunks to ``writer``'s thread from now on (after what was produced before the headers)."""
        frames, self._frames = self._frames, []
        self._conn = conn
        self._fast = writer.fast
        self._pending = writer.pending
        for f in frames:
            self._pending.append((conn, b"%x\r\n%b\r\n" % (len(f), f), False))
        writer.flush()

    def attach(self, transport: asyncio.WriteTransport) -> None:
        """Write straight to ``transport`` from now on (after what was produced before the headers)."""
        frames, self._frames = self._frames, []
        self._transport = transport
        for f in frames:
            self._write(f)

    async def pump(self, send: Send) -> None:
        """Fallback without a transport: send frames through ASGI until the request ends."""
        self._event = ev = asyncio.Event()
        while True:
            if self._frames:
                frames, self._frames = self._frames, []
                await send({"type": "http.response.body", "body": b"".join(frames), "more_body": True})
                continue
            if self.done.done():
                return
            ev.clear()
            await ev.wait()


_FRAMED: dict[tuple[int, int, int, bytes], tuple[object, dict[int, tuple[bytes, bytes]]]] = {}


def _framed_table(table: Mapping[int, bytes] | None, eos: int, fixed: int,
                  tail: bytes) -> dict[int, tuple[bytes, bytes]]:
    """The framed-token table shared by sinks of ``table`` with this EOS, frame size and tail (own if none)."""
    if table is None:
        return {}
    key = (id(table), eos, fixed, tail)
    got = _FRAMED.get(key)
    if got is None or got[0] is not table:
        # filled at once (the emulated model's vocabulary is a few thousand words: about a ms); the table is
        # kept alive here, so its id cannot be reused
        framed = {tid: (b"%x\r\n" % (fixed + len(p)), p + tail) for tid, p in table.items() if tid != eos}
        got = _FRAMED[key] = (table, framed)
    return got[1]


def kind_of(chat: bool) -> str:
    """The ``object`` of a streamed chunk."""
    return "chat.completion.chunk" if chat else "text_completion"


async def disconnected(receive: Receive) -> None:
    """Returns once the ASGI server reports the client gone (the request's body was read before)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _pumped_unless_gone(sink: SseSink, send: Send, receive: Receive) -> bool:
    """``sink.pump(send)`` until the request ends (True), or until the client goes away first (False)."""
    pump = asyncio.ensure_future(sink.pump(send))
    gone = asyncio.ensure_future(disconnected(receive))
    try:
        await asyncio.wait((pump, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pump, gone):
            task.cancel()
    if pump.done() and not pump.cancelled():
        pump.result()  # its own failure, if any, is the response's
        return True
    return False


class SseResponse(Response):
    """An event-stream response fed by an :class:`SseSink` (see the module docstring)."""

    def __init__(self, sink: SseSink, on_close: Callable[[], None], writer: SocketWriter | None = None) -> None:
        super().__init__(media_type="text/event-stream")
        self.sink = sink
        self.on_close = on_close
        self.writer = writer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Headers via ASGI, tokens straight to the transport, the end via ASGI."""
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]})
            ext = scope.get("extensions") or {}
            transport = ext.get(TRANSPORT_KEY) if scope.get("http_version") == "1.1" else None
            sock = transport.get_extra_info("socket") if transport is not None else None
            if (self.writer is not None and transport is not None and sock is not None
                    and not transport.is_closing() and transport.get_write_buffer_size() == 0):
                conn = self.writer.open(sock.fileno())
                self.sink.attach_writer(conn, self.writer)
                await self.sink.done
                self.writer.flush()
                await conn.flushed
                if conn.dead:  # it stopped reading (or left): nothing more to say, its connection goes too
                    transport.abort()
                    return
            elif transport is not None and not transport.is_closing():
                self.sink.attach(transport)
                await self.sink.done
            elif transport is not None:
                return  # the client left before the headers went out: ``on_close`` aborts the request
            elif not await _pumped_unless_gone(self.sink, send, receive):
                return  # (ASGI drops sends to a client that left: only its disconnect tells)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.on_close()  # no-op once finished; frees the request if the handler was cancelled
