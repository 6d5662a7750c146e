"""``--request-log``: one JSON line per ended request with its exact server-side timings.

Why: vLLM's latency histograms (which ``/metrics`` mirrors) have 10 ms-wide buckets between 10 and 20 ms, so a
TTFT quantile read from them is interpolated and can sit several ms from the true one (the shared-prefix bench
at 32 groups: 19.4 ms interpolated, 14.2 ms exact). Whoever compares routers or tunes a profile on these servers
needs the exact figures, per request; this log gives them without a scrape and without touching the per-token
path (a line is made when a request ends, and the lines of one step are written together after it).

Each line (times in model seconds, as the histograms): ``id``, ``arrival_s`` (since the server started),
``ttft_s`` (null when the request ended before its first token), ``queue_s`` (null when it ended before it was
first scheduled), ``e2e_s``, ``prompt_tokens``, ``cached_tokens`` (prompt tokens served from the prefix cache),
``output_tokens``, ``finish`` (``stop``, ``length`` or ``abort``) and ``unix_s`` (the wall clock at the end, to line
it up with other logs). The file is opened for appending, so a rotation by copy-and-truncate keeps working; it is not
rotated here.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from pathlib import Path

import msgspec

from shared.core.engine import Request

log = logging.getLogger("gantry.engine_server")


class RequestRecord(msgspec.Struct, frozen=True):
    """One line of the request log."""

    id: str
    arrival_s: float
    ttft_s: float | None
    queue_s: float | None
    e2e_s: float
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    finish: str
    unix_s: float


def record_of(req: Request, finish: str, end_s: float, unix_s: float) -> RequestRecord:
    """The log line of ``req``, which ended at model time ``end_s`` for ``finish``."""
    first, scheduled = req.first_token_time, req.first_scheduled_time
    return RequestRecord(
        id=req.req_id, arrival_s=round(req.arrival_time, 6),
        ttft_s=round(first - req.arrival_time, 6) if first >= 0 else None,
        queue_s=round(scheduled - req.arrival_time, 6) if scheduled >= 0 else None,
        e2e_s=round(end_s - req.arrival_time, 6), prompt_tokens=req.prompt_len,
        cached_tokens=max(req.num_cached_tokens, 0), output_tokens=req.num_output_tokens, finish=finish,
        unix_s=round(unix_s, 3))


def open_request_log(path: str) -> int:
    """A descriptor of ``path`` opened for appending (raises OSError with the reason: a missing directory, no
    permission, a directory, a pipe nobody reads)."""
    if Path(path).is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory")
    # non-blocking: opening a FIFO without a reader fails at once (ENXIO) instead of hanging the server's start,
    # and a full pipe refuses a write (the lines wait, ``RequestLog.flush``) instead of stalling the step loop;
    # regular files are unaffected
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o644)


MAX_PENDING = 64 << 10  # bytes of lines a pipe has not taken yet before the log gives up on its reader


class RequestLog:
    """Collects one :class:`RequestRecord` line per ended request and appends them once per engine step
    (``flush``, run after each step's tokens went out: one ``write`` for all the requests that ended in it).
    A failed write (a full disk, a reader gone) or a reader that does not keep up is reported once and turns the
    log off, never the server; nothing here raises into the step loop."""

    def __init__(self, path: str, fd: int | None = None) -> None:
        self.path = path
        self._given = fd  # already open (the command line opened it to check it): used as it is
        self._fd: int | None = None
        self._pending = bytearray()
        self._encode = msgspec.json.Encoder().encode
        self.written = 0  # lines the file took
        self.lost = 0  # lines dropped: the log was off (a failed write) or not open

    def open(self) -> None:
        """Open the file, or take the descriptor given (at the server's start; raises OSError as
        :func:`open_request_log`)."""
        if self._fd is None:
            given, self._given = self._given, None
            # a copy of the descriptor given: this log closes its own at the stop, and the number the options
            # hold stays the file's (a second server built from the same options must not write to whatever
            # later reuses a closed number)
            self._fd = os.dup(given) if given is not None else open_request_log(self.path)

    def write(self, req: Request, finish: str, end_s: float) -> None:
        """Note ``req``, which ended at model time ``end_s``; it reaches the file at the next :meth:`flush`."""
        if self._fd is None:
            self.lost += 1
            return
        try:
            self._pending += self._encode(record_of(req, finish, end_s, time.time()))
            self._pending += b"\n"
        except Exception:  # a record that cannot be encoded must not stop the step that ended it
            log.exception("request log: request %r could not be recorded", req.req_id)
            self.lost += 1

    def flush(self) -> None:
        """Append the lines noted since the last flush in one write. What a pipe does not take (a reader a little
        behind) waits for the next flush, so a line cut by a short write is finished by the next one; past
        ``MAX_PENDING`` bytes waiting (a reader that does not keep up) the log is turned off."""
        pending, fd = self._pending, self._fd
        if not pending or fd is None:
            return
        try:
            n = os.write(fd, pending)
        except BlockingIOError:  # a full pipe: nothing taken this time
            n = 0
        except OSError as err:  # a full disk (ENOSPC), a reader gone (EPIPE)
            self._off(f"{err.strerror or err}", pending.count(b"\n"))
            return
        self.written += pending.count(b"\n", 0, n)
        del pending[:n]
        if len(pending) > MAX_PENDING:
            self._off(f"the reader is not keeping up ({len(pending)} bytes waiting)", pending.count(b"\n"))

    def _off(self, why: str, lines: int) -> None:
        log.warning("request log %s: write failed (%s): the request log is off from now on", self.path, why)
        self.lost += lines
        self._pending.clear()
        self.close()

    def close(self) -> None:
        """Write what is pending and close the file (idempotent)."""
        if self._pending and self._fd is not None:
            self.flush()
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
