"""A blocking, read-only Redis connection for the CLI's read commands (issue 17: read commands within 0.5 s).

redis-py with asyncio is over half of what `gantry models` executes (~300 M and ~170 M instructions of imports
against ~90 M for the bare interpreter). The reads of a snapshot need few commands (HGETALL, HGET, HMGET,
SMEMBERS; AUTH, SELECT and PING to start) and their replies, so this module speaks them itself over a socket, in
RESP2 as redis-py does, and answers the same Python values (bytes, dicts, sets) for the state layer's own reading
code (``shared.state.StateStore``), run to completion without an event loop: every await on this connection
returns without suspending.

It handles only the plain case, ``redis://[user:password@]host[:port][/db]``; for any other URL, and on any
failure (refused, timeout, authentication, an error reply, anything unexpected), ``ReaderFailed`` tells the caller
to read through redis-py instead, which then succeeds or fails with the one error message the CLI always gave.
"""

from __future__ import annotations

import socket
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

T = TypeVar("T")
Arg = str | bytes | int | float


class ReaderFailed(Exception):
    """This connection cannot do what was asked: read through redis-py instead."""


class ReaderTimedOut(ReaderFailed):
    """Redis took the connection but answered nothing in time: redis-py would wait as long again, to the same end."""


class RedisReader:
    """Blocking RESP2 connection offering the read calls ``StateStore`` makes, as awaitables that never suspend."""

    blocking = True  # its reads are awaited one after another, never gathered (no event loop runs them)

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._in = sock.makefile("rb")

    @classmethod
    def connect(cls, url: str, connect_timeout: float, timeout: float) -> RedisReader:
        """A connection that authenticated, selected its database and answered PING; ReaderFailed otherwise."""
        try:
            host, port, user, password, db = _parse(url)
            sock = socket.create_connection((host, port), timeout=connect_timeout)
        except (OSError, ValueError) as err:
            raise ReaderFailed(str(err)) from None
        sock.settimeout(timeout)
        reader = cls(sock)
        try:
            if password is not None:
                reader.call(("AUTH", user, password) if user else ("AUTH", password))
            if db:
                reader.call(("SELECT", db))
            if reader.call(("PING",)) != b"PONG":
                raise ReaderFailed("no PONG")
        except ReaderFailed:
            reader.close()
            raise
        return reader

    def close(self) -> None:
        """Close the socket."""
        self._in.close()
        self._sock.close()

    def call(self, command: tuple[Arg, ...]) -> Any:
        """One command's reply."""
        return self.call_many([command])[0]

    def call_many(self, commands: list[tuple[Arg, ...]]) -> list[Any]:
        """The replies of ``commands``, sent together (one round trip, as a redis-py pipeline)."""
        try:
            self._sock.sendall(b"".join(_encode(c) for c in commands))
            return [_convert(str(c[0]), self._reply()) for c in commands]
        except TimeoutError:
            raise ReaderTimedOut("no answer in time") from None
        except (OSError, ValueError, IndexError) as err:
            raise ReaderFailed(str(err) or type(err).__name__) from None

    def _reply(self) -> Any:
        line = self._in.readline()
        if not line.endswith(b"\r\n"):
            raise ReaderFailed("connection closed")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise ReaderFailed(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            data = self._in.read(size + 2)
            if len(data) != size + 2:
                raise ReaderFailed("connection closed")
            return data[:-2]
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self._reply() for _ in range(count)]
        raise ReaderFailed(f"unexpected reply {line[:20]!r}")

    # -- what StateStore calls (redis.asyncio.Redis' signatures, read commands only) --------------------------

    def register_script(self, script: str) -> ReadOnlyScript:
        """A script handle that refuses to run: this connection only reads."""
        return ReadOnlyScript()

    def pipeline(self, transaction: bool = True) -> Pipeline:
        """Commands sent together on ``execute`` (reads need no MULTI: they change nothing)."""
        return Pipeline(self)

    async def hgetall(self, key: Arg) -> dict[bytes, bytes]:
        """HGETALL."""
        return dict(self.call(("HGETALL", key)))

    async def hget(self, key: Arg, field: Arg) -> bytes | None:
        """HGET."""
        found: bytes | None = self.call(("HGET", key, field))
        return found

    async def smembers(self, key: Arg) -> set[bytes]:
        """SMEMBERS."""
        found: set[bytes] = self.call(("SMEMBERS", key))
        return found

    def __getattr__(self, name: str) -> Any:
        return _missing(name)


class Pipeline:
    """Read commands queued for one round trip, as a redis-py pipeline (each call returns the pipeline)."""

    def __init__(self, reader: RedisReader) -> None:
        self._reader = reader
        self._commands: list[tuple[Arg, ...]] = []

    def hgetall(self, key: Arg) -> Pipeline:
        """Queue HGETALL."""
        self._commands.append(("HGETALL", key))
        return self

    def hmget(self, key: Arg, fields: Iterable[Arg], *more: Arg) -> Pipeline:
        """Queue HMGET."""
        self._commands.append(("HMGET", key, *fields, *more))
        return self

    async def execute(self) -> list[Any]:
        """The replies, in order."""
        commands, self._commands = self._commands, []
        return self._reader.call_many(commands)

    def __getattr__(self, name: str) -> Any:
        return _missing(name)


class ReadOnlyScript:
    """What ``register_script`` answers here: the state layer registers its scripts up front; reads never run one."""

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Refused: this connection only reads."""
        raise ReaderFailed("a read-only connection runs no script")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine whose awaits are all on a RedisReader (none suspends): no event loop needed.
    ReaderFailed if it suspends after all (it awaited something else)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise ReaderFailed("the read awaited something other than this connection")


def _missing(name: str) -> Any:
    # A call the state layer's reads make that this connection does not offer (they changed since): the caller
    # reads through redis-py instead; the unit tests, which read through this connection only, fail on it.
    if name.startswith("__"):
        raise AttributeError(name)
    raise ReaderFailed(f"a read-only connection offers no {name}")


def _parse(url: str) -> tuple[str, int, str | None, str | None, int]:
    """(host, port, user, password, db) of a plain ``redis://`` URL; ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme != "redis" or parts.query or parts.fragment or not parts.hostname:
        raise ValueError("not a plain redis:// URL")
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if user is not None and password is None:
        raise ValueError("a user without a password")
    path = parts.path.lstrip("/")
    if path and not (path.isascii() and path.isdigit() and len(path) <= 5):
        raise ValueError("a database that is not a plain number")
    return parts.hostname, parts.port or 6379, user, password, int(path or 0)


def _encode(command: tuple[Arg, ...]) -> bytes:
    chunks = [b"*%d\r\n" % len(command)]
    for arg in command:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        chunks.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(chunks)


def _convert(command: str, reply: Any) -> Any:
    """redis-py's answer for ``reply`` (decode_responses off): HGETALL a dict, SMEMBERS a set, the rest as is."""
    if command == "HGETALL":
        return dict(zip(reply[::2], reply[1::2], strict=True))
    if command == "SMEMBERS":
        return set(reply)
    return reply
