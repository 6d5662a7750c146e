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
  their idea of a transient failure (``shared.host.isolation.transient``) see what they saw before; a LOADING
  reply (``BusyLoadingError``: the command did not run) is retried the same way, as redis-py does;
- a reply timeout of ``TIMEOUT_S`` (redis-py's default ``socket_timeout``; also for connecting): a reply that
  late means a dead or blackholed server, so the connection is dropped and the call retried as on any
  connection failure (``redis.exceptions.TimeoutError`` once the retries are spent), and TCP keepalive is on
  (as redis-py's default): every script's work is bounded by ``SCRIPT_CHUNK``, far below the timeout.

A retried call may already have run on the server (the connection failed after the command was written). Every
script was checked run twice per call (``tests/unit/state/test_replay.py``; docs/bus.md, "Replays"):

- ``commit``: a replay answers "ok" again for what the first run committed (``gantry:claims:by``);
- ``converge_up``, ``create_pending``, ``mark_state``, ``set_state``, ``register``: their last key names the call
  (``shared.state.replay``); a replay answers the first run's reply and writes nothing;
- ``release``, ``forget_worker``, ``unlock``: a second run writes nothing more; only a count or flag no caller reads
  can differ.

Concurrent calls share one connection: commands are pipelined and replies matched in order (Redis runs scripts
one at a time anyway). A caller cancelled while waiting leaves its reply to be read and dropped; the
connection stays usable (redis-py closes it instead). A call that times out fails its connection with every call
pipelined behind it: a reply arriving after the timeout could otherwise only be handed to the next caller.

Only plain ``redis://[user:password@]host[:port][/db]`` and ``unix://path`` URLs without options are spoken
here; ``from_url`` answers None for any other (TLS, timeouts or other options in the query), and the store
keeps redis-py's scripts for those.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import random
import socket
from collections import deque
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis
from redis._parsers import BaseParser, Encoder
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    ConnectionError,
    InvalidResponse,
    NoScriptError,
    RedisError,
    TimeoutError,
)

RETRIES = 10  # redis-py's defaults (redis._defaults): retries of a call whose connection failed ...
BACKOFF_BASE_S = 0.01  # ... with an exponential backoff with jitter from this
BACKOFF_CAP_S = 1.0  # ... up to this
TIMEOUT_S = 5.0  # redis-py's default socket timeout: a reply (or a connect) later than this fails the connection
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

    def __init__(self, timeout: float = TIMEOUT_S) -> None:
        self.reader = hiredis.Reader(protocolError=InvalidResponse, replyError=BaseParser.parse_error)
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()  # with when each command was written
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None
        self.timeout = timeout
        self._timer: asyncio.TimerHandle | None = None  # armed while commands wait: checks the oldest's deadline

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
                fut, _ = self.waiting.popleft()
                if not fut.done():  # its caller was cancelled: the reply is read and dropped
                    fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"Connection closed by server: {exc}" if exc else "Connection closed by server."))

    def _fail(self, exc: Exception) -> None:
        self.lost = exc
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self.waiting:
            fut, _ = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(exc)

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        """Write one packed command; the future gets its reply (an error reply as an exception instance)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if self.lost is not None or self.transport is None or self.transport.is_closing():
            fut.set_exception(self.lost or ConnectionError("Connection closed."))
            return fut
        self.waiting.append((fut, loop.time()))
        if self._timer is None:  # one timer per connection, not per command: the hot path pays a time() read
            self._timer = loop.call_later(self.timeout, self._check)
        self.transport.write(packed)
        return fut

    def _check(self) -> None:
        """The oldest waiting command's deadline: past it, the connection is failed (its reply and any reply
        behind it would come too late for its caller, and to the wrong caller if handed on); else checked again
        at that deadline."""
        self._timer = None
        if not self.waiting:
            return
        loop = asyncio.get_running_loop()
        due = self.waiting[0][1] + self.timeout
        if loop.time() < due:
            self._timer = loop.call_at(due, self._check)
            return
        self._fail(TimeoutError(f"Timeout reading from Redis: no reply in {self.timeout:g} s"))
        if self.transport is not None:
            self.transport.close()


class ScriptConnection:
    """Runs Lua scripts (EVALSHA, SCRIPT LOAD) on one pipelined connection, reconnecting as needed."""

    def __init__(
        self, *, host: str = "", port: int = 6379, path: str = "", user: str | None = None,
        password: str | None = None, db: int = 0, timeout: float = TIMEOUT_S,
    ) -> None:
        self._host, self._port, self._path = host, port, path
        self._timeout = timeout
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
            proto = None
            try:
                proto = await self._connected()
                reply = await proto.send(packed)
            except (ConnectionError, TimeoutError, OSError) as exc:
                failures = await self._failed(exc, proto, failures)
                continue
            if isinstance(reply, RedisError):
                if isinstance(reply, BusyLoadingError):  # the server is loading its data: the command did not run
                    failures = await self._failed(reply, proto, failures)
                    continue
                raise reply
            return reply

    async def _failed(self, exc: Exception, proto: _Protocol | None, failures: int) -> int:
        """After a call's ``failures``-th failure: its connection dropped, then the backoff before the next try
        (the count of failures so far), or ``exc`` raised when the retries are spent or the identity refused."""
        self._drop(proto)  # that connection only: a concurrent caller may have opened the current one already
        failures += 1
        if failures > RETRIES or isinstance(exc, AuthenticationError):  # a refused identity stays refused
            if isinstance(exc, (ConnectionError, TimeoutError)):
                raise exc
            raise ConnectionError(f"Error connecting to Redis: {exc}") from exc
        await asyncio.sleep(min(BACKOFF_CAP_S, random.random() * BACKOFF_BASE_S * 2**failures))
        return failures

    async def close(self) -> None:
        """Close the connection (a later call opens a new one)."""
        self._drop(self._proto)

    def _drop(self, proto: _Protocol | None) -> None:
        """Close ``proto``; forget it if it is the current connection (None: nothing was connected)."""
        if proto is None:
            return
        if self._proto is proto:
            self._proto = None
        if proto.lost is None:
            proto._fail(ConnectionError("Connection closed after a failure."))
        if proto.transport is not None:
            proto.transport.close()

    async def _connected(self) -> _Protocol:
        proto = self._proto
        if proto is not None and proto.lost is None:
            return proto
        async with self._connect_lock:  # one connect for all the callers that found none
            proto = self._proto
            if proto is None or proto.lost is not None:
                self._drop(proto)
                proto = await asyncio.wait_for(self._connect(), self._timeout)
                self._proto = proto
            return proto

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        made = functools.partial(_Protocol, self._timeout)
        if self._path:
            _, proto = await loop.create_unix_connection(made, self._path)
        else:
            transport, proto = await loop.create_connection(made, self._host, self._port)
            sock = transport.get_extra_info("socket")
            if sock is not None:  # a dead peer's connection is found by the kernel too, as redis-py's default
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        hello: list[tuple[Arg, ...]] = []
        if self._password is not None:
            hello.append(("AUTH", self._user, self._password) if self._user else ("AUTH", self._password))
        if self._db:
            hello.append(("SELECT", self._db))
        replies: list[asyncio.Future[Any]] = []
        try:
            replies += [proto.send(_pack(cmd)) for cmd in hello]
            for fut in replies:
                reply = await fut
                if isinstance(reply, RedisError):
                    raise reply
        except BaseException:
            if proto.transport is not None:
                proto.transport.close()
            for fut in replies:  # failed with the connection (its timeout, say): not awaited any more
                if fut.done() and not fut.cancelled():
                    fut.exception()
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
