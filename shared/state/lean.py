"""Lua scripts over a lean RESP connection of the store's own (issue 11: the reconciler's commit path).

Every ledger change is one EVALSHA. Through redis-py's asyncio client a call costs ~120 µs of client CPU (its
pool, retry, observability and timeout layers around each command) against ~27 µs for the same round trip
over a bare asyncio protocol with hiredis packing and parsing; at 500 placements/s the reconciler makes a few
hundred such calls a second. This module is that bare protocol, for script calls only, with redis-py's
semantics kept where they matter:

- the same bytes on the wire (``hiredis.pack_command``, as ``shared.state.resp``) and the same replies
  (hiredis' parser, bytes, RESP2), error replies raised as the exceptions redis-py raises for them
  (``BaseParser.parse_error``: ``NoScriptError``, ``BusyLoadingError``, ``NoPermissionError``...);
- NOSCRIPT: the script is loaded and called again (as ``AsyncScript``);
- the identity of the URL (``AUTH user password``) and its database (``SELECT``) on every new connection;
- connection failures raise ``redis.exceptions.ConnectionError`` and the call is retried on a new connection
  with redis-py's default policy (10 retries, exponential backoff with jitter from 10 ms to 1 s), so callers and
  their idea of a transient failure (``shared.host.isolation.transient``) see what they saw before;
- no reply timeout, as redis-py without ``socket_timeout`` (every script's work is bounded by ``SCRIPT_CHUNK``).

Concurrent calls share one connection: commands are pipelined and replies matched in order (Redis runs scripts
one at a time anyway). A caller cancelled while waiting leaves its reply to be read and dropped; the
connection stays usable (redis-py closes it instead).

Only plain ``redis://[user:password@]host[:port][/db]`` and ``unix://path`` URLs without options are spoken
here; ``from_url`` answers None for any other (TLS, timeouts or other options in the query), and the store
keeps redis-py's scripts for those.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections import deque
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis
from redis._parsers import BaseParser, Encoder
from redis.exceptions import AuthenticationError, ConnectionError, InvalidResponse, NoScriptError, RedisError

RETRIES = 10  # redis-py's defaults (redis._defaults): retries of a call whose connection failed ...
BACKOFF_BASE_S = 0.01  # ... with an exponential backoff with jitter from this
BACKOFF_CAP_S = 1.0  # ... up to this
Arg = str | bytes | int | float


_FAST_TYPES = frozenset({bytes, str, int})
_ENCODER = Encoder(encoding="utf-8", encoding_errors="strict", decode_responses=False)  # type: ignore[no-untyped-call]


def _pack(args: Sequence[Any]) -> bytes:
    """RESP bytes of one command: hiredis for bytes, str and int; any other argument first through redis-py's
    encoder, so a float's wire form and the error for an unsupported type are redis-py's."""
    for arg in args:
        if type(arg) not in _FAST_TYPES:
            args = [_ENCODER.encode(a) for a in args]  # type: ignore[no-untyped-call]
            break
    packed: bytes = hiredis.pack_command(tuple(args))
    return packed


class _Protocol(asyncio.Protocol):
    """One connection: commands written as they come, replies handed to their callers in order."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(protocolError=InvalidResponse, replyError=BaseParser.parse_error)
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's transports are not asyncio's classes

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except Exception as exc:  # a protocol error: the stream cannot be trusted past it
                self._fail(ConnectionError(f"invalid reply from Redis: {exc}"))
                if self.transport is not None:
                    self.transport.close()
                return
            if reply is False:
                return
            if self.waiting:
                fut = self.waiting.popleft()
                if not fut.done():  # its caller was cancelled: the reply is read and dropped
                    fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"Connection closed by server: {exc}" if exc else "Connection closed by server."))

    def _fail(self, exc: Exception) -> None:
        self.lost = exc
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(exc)

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        """Write one packed command; the future gets its reply (an error reply as an exception instance)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.lost is not None or self.transport is None or self.transport.is_closing():
            fut.set_exception(self.lost or ConnectionError("Connection closed."))
            return fut
        self.waiting.append(fut)
        self.transport.write(packed)
        return fut


class ScriptConnection:
    """Runs Lua scripts (EVALSHA, SCRIPT LOAD) on one pipelined connection, reconnecting as needed."""

    def __init__(
        self, *, host: str = "", port: int = 6379, path: str = "", user: str | None = None,
        password: str | None = None, db: int = 0,
    ) -> None:
        self._host, self._port, self._path = host, port, path
        self._user, self._password, self._db = user, password, db
        self._proto: _Protocol | None = None
        self._connect_lock = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str) -> ScriptConnection | None:
        """A connection to a plain ``redis://`` or ``unix://`` URL; None for any URL this module does not speak."""
        try:
            parts = urlsplit(url)
            if parts.query or parts.fragment:
                return None
            user = unquote(parts.username) if parts.username else None
            password = unquote(parts.password) if parts.password else None
            if user is not None and password is None:  # redis-py's AUTH for that case is its own to make
                return None
            if parts.scheme == "redis" and parts.hostname:
                db_text = parts.path.lstrip("/")
                if db_text and not (db_text.isascii() and db_text.isdigit()):
                    return None
                return cls(host=parts.hostname, port=parts.port or 6379, user=user, password=password,
                           db=int(db_text or 0))
            if parts.scheme == "unix" and parts.path and not parts.hostname:
                return cls(path=unquote(parts.path), user=user, password=password)
        except ValueError:  # a malformed port and the like: redis-py says what is wrong with it
            return None
        return None

    def script(self, text: str) -> LeanScript:
        """A handle that runs ``text`` by its SHA1, loading it when the server does not know it."""
        return LeanScript(self, text)

    async def call(self, *args: Arg) -> Any:
        """One command's reply; an error reply raised as redis-py raises it; retried on a new connection when
        the connection fails (redis-py's default policy)."""
        packed = _pack(args)
        failures = 0
        while True:
            try:
                proto = await self._connected()
                reply = await proto.send(packed)
            except (ConnectionError, OSError) as exc:
                self._drop()
                failures += 1
                if failures > RETRIES or isinstance(exc, AuthenticationError):  # a refused identity stays refused
                    if isinstance(exc, ConnectionError):
                        raise
                    raise ConnectionError(f"Error connecting to Redis: {exc}") from exc
                await asyncio.sleep(min(BACKOFF_CAP_S, random.random() * BACKOFF_BASE_S * 2**failures))
                continue
            if isinstance(reply, RedisError):
                raise reply
            return reply

    async def close(self) -> None:
        """Close the connection (a later call opens a new one)."""
        self._drop()

    def _drop(self) -> None:
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()

    async def _connected(self) -> _Protocol:
        proto = self._proto
        if proto is not None and proto.lost is None:
            return proto
        async with self._connect_lock:  # one connect for all the callers that found none
            proto = self._proto
            if proto is None or proto.lost is not None:
                self._drop()
                proto = await self._connect()
                self._proto = proto
            return proto

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        if self._path:
            _, proto = await loop.create_unix_connection(_Protocol, self._path)
        else:
            _, proto = await loop.create_connection(_Protocol, self._host, self._port)
        hello: list[tuple[Arg, ...]] = []
        if self._password is not None:
            hello.append(("AUTH", self._user, self._password) if self._user else ("AUTH", self._password))
        if self._db:
            hello.append(("SELECT", self._db))
        try:
            replies = [proto.send(_pack(cmd)) for cmd in hello]
            for fut in replies:
                reply = await fut
                if isinstance(reply, RedisError):
                    raise reply
        except BaseException:
            if proto.transport is not None:
                proto.transport.close()
            raise
        return proto


class LeanScript:
    """A Lua script called as redis-py's ``AsyncScript``: ``await script(keys=[...], args=[...])``."""

    def __init__(self, conn: ScriptConnection, text: str) -> None:
        self.conn = conn
        self.script = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    async def __call__(self, keys: Sequence[Arg] = (), args: Sequence[Arg] = ()) -> Any:
        """The script's reply."""
        try:
            return await self.conn.call("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:  # a restarted or flushed server: load it and call again
            self.sha = (await self.conn.call("SCRIPT", "LOAD", self.script)).decode()
            return await self.conn.call("EVALSHA", self.sha, len(keys), *keys, *args)
