"""``--request-log``: one JSON line per ended request with its exact server-side timings.

Why: vLLM's latency histograms (which ``/metrics`` mirrors) have 10 ms-wide buckets between 10 and 20 ms, so a
TTFT quantile read from them is interpolated and can sit several ms from the true one (the shared-prefix bench
at 32 groups: 19.4 ms interpolated, 14.2 ms exact). Whoever compares routers or tunes a profile on these servers
needs the exact figures, per request; this log gives them without a scrape and without touching the hot path
of requests that never reach it (written once, when the request ends).

Each line (times in model seconds, as the histograms): ``id``, ``arrival_s`` (since the server started),
``ttft_s``, ``queue_s`` (null when the request ended before it was scheduled or before its first token),
``e2e_s``, ``prompt_tokens``, ``cached_tokens`` (prompt tokens served from the prefix cache), ``output_tokens``,
``finish`` (``stop``, ``length`` or ``abort``) and ``unix_s`` (the wall clock at the end, to line it up with
other logs). The file is opened for appending, so a rotation by copy-and-truncate keeps working; it is not
rotated here.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from pathlib import Path
from typing import IO

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


def open_request_log(path: str) -> IO[bytes]:
    """``path`` opened for appending (raises OSError with the reason: a missing directory, no permission, a
    directory, a pipe nobody reads)."""
    if Path(path).is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory")
    # non-blocking: opening a FIFO without a reader fails at once (ENXIO) instead of hanging the server's start,
    # and a full pipe fails a write (which turns the log off) instead of stalling the step loop; regular files
    # are unaffected
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o644)
    return os.fdopen(fd, "ab", buffering=0)


class RequestLog:
    """Appends one :class:`RequestRecord` line per ended request; a failed write (a full disk) is reported once
    and turns the log off, never the server."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh: IO[bytes] | None = fh
        self._encode = msgspec.json.Encoder().encode
        self.written = 0

    def write(self, req: Request, finish: str, end_s: float) -> None:
        """Log ``req``, which ended at model time ``end_s``."""
        fh = self._fh
        if fh is None:
            return
        try:
            # one unbuffered write per line: a reader sees whole lines as soon as the request ends
            fh.write(self._encode(record_of(req, finish, end_s, time.time())) + b"\n")
        except OSError as err:
            log.warning("request log write failed (%s): the request log is off from now on", err)
            self.close()
            return
        self.written += 1

    def close(self) -> None:
        """Close the file (idempotent)."""
        fh, self._fh = self._fh, None
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()
