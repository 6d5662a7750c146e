"""The engine feed off the deciding process: a child process takes the engines' NATS reports and hands them to
the picker in batches.

Why: the engines' load reports (every 50-100 ms each) and KV events (one message per engine step that stored
or evicted blocks) arrive at a rate set by the engines, not by the requests the picker decides. On the
picker's event loop each message cost nats-py's Python protocol parsing, a queue hop into the subscription's
task and a callback before it was applied (with the apply itself, 0.6-0.7 ms of the picker's 2.1 ms of CPU
per request in a 400 requests/s bench run), and a check arriving meanwhile waited for it (docs/gateway.md,
"The engine feed"). The child (``python -m services.gateway.feed_relay``) does the NATS side, on the other
core when one is free, and writes what arrived in one frame per ``window_s`` (a message after a quiet window goes
at once, the rest of a burst one window after the previous frame); the picker reads one frame per
wake-up and applies every message in it in arrival order (per subscription, as nats-py delivers them), with
the same code as before (``shared.host.engine_feed``: decoding, dead letters, the pool, the KV numbering). A
message reaches the routing core at most ``window_s`` (plus one process hop) later than it would have.

Framing on the child's stdout: a 4-byte big-endian length, then a msgpack array of ``Relayed``; an empty
frame right after the child has subscribed says it is ready. The child exits when its stdin closes (the
picker is gone, however it died); the picker starts a new child when one dies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from enum import IntEnum
from typing import Any

import msgspec

from shared.bus import subjects
from shared.bus.connection import nats_options
from shared.envsettings import EnvSettings, credentials_on_command_line

log = logging.getLogger("gantry.gateway")

LENGTH = struct.Struct("!I")
MAX_FRAME_BYTES = 64 << 20  # far beyond any window's worth of reports; a larger length is a broken pipe
FRAME_BUDGET_BYTES = MAX_FRAME_BYTES // 2  # the child writes a frame early rather than pass this (a message <= 8 MB)
READY_TIMEOUT_S = 30.0
RESTART_DELAY_S = 0.5
NATS_URL_ENV = "GANTRY_FEED_RELAY_NATS_URL"
TLS_CA_ENV = "GANTRY_TLS_CA_FILE"  # NATS over TLS: the CA to trust (empty: no TLS), as every Gantry client


class Kind(IntEnum):
    """Which subscription a message came from."""

    METRICS = 0  # subjects.ENGINE_METRICS_ALL
    KV = 1  # subjects.ENGINE_KV_EVENTS_ALL


class Relayed(msgspec.Struct, array_like=True, frozen=True):
    """One NATS message as the picker's feed reads it (``subject``, ``data``), with when the child received it
    (the pool's "last heard", as if the picker had received it itself), and its NATS headers (an engine's
    report signature, ``shared.host.report_auth``)."""

    kind: Kind
    subject: str
    data: bytes
    at: float
    headers: dict[str, str] | None = None


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(list[Relayed]).decode


def frame(batch: list[Relayed]) -> bytes:
    """One frame of the child's output."""
    payload = _encode(batch)
    return LENGTH.pack(len(payload)) + payload


def unframe(payload: bytes) -> list[Relayed]:
    """A frame's messages (its payload, without the length)."""
    return _decode(payload)


# -- the child ---------------------------------------------------------------------------------------------
def connect_options(nats_url: str, tls_ca_file: str) -> dict[str, Any]:
    """The child's NATS options: those of every Gantry client (credentials from the URL, TLS when a CA is given)."""
    return nats_options(EnvSettings(nats_url=nats_url, tls_ca_file=tls_ca_file))


async def relay(nats_url: str, window_s: float, out_fd: int = 1, in_fd: int = 0, tls_ca_file: str = "") -> None:
    """Subscribe to every engine's reports and KV events and write them to ``out_fd`` in frames, one per
    ``window_s`` at most, until ``in_fd`` closes."""
    import nats  # only the child pays for it here

    loop = asyncio.get_running_loop()
    pending: list[Relayed] = []
    held = 0  # bytes of the messages pending
    last = 0.0  # when the last frame was written (loop time)
    due: asyncio.TimerHandle | None = None  # the pending messages' flush

    def flush() -> None:
        nonlocal last, held, due
        if due is not None:  # (written early, for the budget: the window's own flush is not needed any more)
            due.cancel()
            due = None
        if not pending:
            return
        last = loop.time()
        data = frame(pending)
        pending.clear()
        held = 0
        view = memoryview(data)
        while view:  # a blocking pipe: the picker reads it as fast as it applies
            view = view[os.write(out_fd, view):]

    def taker(kind: Kind) -> Callable[[object], Awaitable[None]]:
        async def take(msg: object) -> None:
            nonlocal held, due
            size = len(msg.data)  # type: ignore[attr-defined]
            if held + size > FRAME_BUDGET_BYTES:
                # a burst of large messages in a long window: written now rather than past the reader's frame
                # bound (which would end this child and lose the whole frame, every engine's reports in it)
                flush()
            held += size
            pending.append(Relayed(kind, msg.subject, msg.data, time.time(),  # type: ignore[attr-defined]
                                   msg.headers))  # type: ignore[attr-defined]
            if len(pending) == 1:
                # at most one frame per window, and no wait for a message after a quiet window: a lone report
                # goes at once, the rest of a burst follows together one window after the previous frame
                due = loop.call_at(max(loop.time(), last + window_s), flush)
        return take

    nc = await nats.connect(nats_url, max_reconnect_attempts=-1, **connect_options(nats_url, tls_ca_file))
    await nc.subscribe(subjects.ENGINE_METRICS_ALL, cb=taker(Kind.METRICS))
    await nc.subscribe(subjects.ENGINE_KV_EVENTS_ALL, cb=taker(Kind.KV))
    await nc.flush()
    # ready: an empty frame. Not flush(): reports that arrived while subscribing are already pending, with
    # their flush scheduled, and the picker discards the ready frame's contents.
    view = memoryview(frame([]))
    while view:
        view = view[os.write(out_fd, view):]
    gone = asyncio.Event()

    class Watch(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            gone.set()

    await loop.connect_read_pipe(Watch, os.fdopen(in_fd, "rb", buffering=0))
    await gone.wait()
    with contextlib.suppress(Exception):
        await nc.close()


def main(argv: list[str] | None = None) -> None:
    """``python -m services.gateway.feed_relay [--nats-url URL] --window-ms N`` (started by the picker)."""
    p = argparse.ArgumentParser(prog="python -m services.gateway.feed_relay", description=__doc__)
    p.add_argument("--nats-url", default=None,
                   help=f"default: ${NATS_URL_ENV} (how the picker passes it: a URL with credentials stays out of ps)")
    p.add_argument("--window-ms", type=float, default=10.0)
    p.add_argument("--tls-ca-file", default=os.environ.get(TLS_CA_ENV, ""),
                   help=f"NATS over TLS: the CA to trust (default: ${TLS_CA_ENV}; empty: no TLS)")
    a = p.parse_args(argv)
    if refused := credentials_on_command_line("--nats-url", a.nats_url, NATS_URL_ENV):
        sys.exit(f"{p.prog}: error: {refused}")
    a.nats_url = a.nats_url or os.environ.get(NATS_URL_ENV)
    if not a.nats_url:
        p.error(f"--nats-url or ${NATS_URL_ENV} is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import uvloop

    with contextlib.suppress(BrokenPipeError):  # the picker is gone
        uvloop.run(relay(a.nats_url, a.window_ms / 1000, tls_ca_file=a.tls_ca_file))


# -- the picker's side --------------------------------------------------------------------------------------
Deliver = Callable[[list[Relayed]], Awaitable[None]]


class FeedRelay:
    """The child process and the frames it writes, handed to ``deliver`` in order (one call per frame)."""

    def __init__(self, nats_url: str, window_s: float, deliver: Deliver, tls_ca_file: str = "") -> None:
        self.nats_url = nats_url
        self.tls_ca_file = tls_ca_file
        self.window_s = window_s
        self.deliver = deliver
        self.proc: asyncio.subprocess.Process | None = None
        self.frames = 0  # frames applied (tests, operators)
        self.starts = 0  # children that became ready (more than one: a child died and was replaced)

    async def start(self) -> None:
        """Start the child; returns once it has subscribed (its first, empty frame). Raises when it does not."""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.gateway.feed_relay", "--window-ms", str(self.window_s * 1000),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env=self.child_env())
        assert self.proc.stdout is not None
        try:
            await asyncio.wait_for(self._read(self.proc.stdout), READY_TIMEOUT_S)
        except BaseException:
            await self._end()
            raise
        self.starts += 1

    def child_env(self) -> dict[str, str]:
        """The child's environment: this process's, with the NATS URL and the CA to trust (set even when empty:
        this picker's settings, not a stray variable, decide whether the child uses TLS)."""
        return {**os.environ, NATS_URL_ENV: self.nats_url, TLS_CA_ENV: self.tls_ca_file}

    @staticmethod
    async def _read(out: asyncio.StreamReader) -> list[Relayed]:
        (n,) = LENGTH.unpack(await out.readexactly(LENGTH.size))
        if n > MAX_FRAME_BYTES:
            raise ValueError(f"feed relay frame of {n} bytes")
        return unframe(await out.readexactly(n))

    async def run(self) -> None:
        """Apply frames until cancelled; a child that dies (or writes garbage) is replaced."""
        while True:
            if self.proc is None or self.proc.stdout is None:
                try:
                    await self.start()
                except Exception as err:  # NATS unreachable, the child failed: try again
                    log.error("engine feed relay did not start (%r); retrying", err)
                    await asyncio.sleep(RESTART_DELAY_S)
                    continue
            assert self.proc is not None and self.proc.stdout is not None
            try:
                while True:
                    batch = await self._read(self.proc.stdout)
                    try:
                        await self.deliver(batch)
                    except Exception:  # as a NATS callback that raises: logged, the feed goes on
                        log.exception("engine feed: a frame of %d messages failed to apply", len(batch))
                    self.frames += 1
            except (asyncio.IncompleteReadError, ValueError, msgspec.DecodeError) as err:
                log.error("engine feed relay lost (%r); starting another", err)
            await self._end()
            await asyncio.sleep(RESTART_DELAY_S)

    async def _end(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    async def stop(self) -> None:
        """End the child."""
        await self._end()


if __name__ == "__main__":
    main()
