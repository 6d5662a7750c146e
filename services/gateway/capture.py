"""Capturing the traffic the picker routes as a replayable trace (Mooncake-style JSONL).

One line per finished request: ``timestamp`` (ms since the capture started), ``input_length`` (prompt
tokens, as the engine counts them), ``output_length`` (generated tokens, from the response's ``usage``,
else counted from the streamed chunks), ``hash_ids`` (chained ids of the prompt's 512-token blocks: equal
ids mean equal content up to the end of that block; the last id covers a partial block), plus ``time``
(unix seconds, to merge the files of several picker replicas) and ``model``. The prompt text is never
written, only salted hashes of its token ids. ``gantry simulate --trace FILE`` and
``bench/routing_quality.py`` read the format (``shared.traces.load_mooncake``).

Pure apart from :class:`TraceWriter`, which appends lines to a file.
"""

from __future__ import annotations

import hashlib
import logging
import re
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import msgspec

log = logging.getLogger("gantry.gateway")

BLOCK = 512  # Mooncake's prefix unit (shared.traces.load_mooncake reads ids as 512-token blocks)
MAX_CAPTURE_BYTES = 128 << 20  # a capture stops growing here: the most ``gantry simulate --trace`` reads
_MASK = (1 << 63) - 1
# at most 18 digits: int() of a longer run (an upstream's garbage) raised inside the stream's handler
_USAGE = re.compile(rb'"completion_tokens"\s*:\s*(\d{1,18})(?!\d)')
_CARRY = 64  # bytes of the previous chunk kept so a pattern split across chunks is still found
# a streamed chunk carrying generated text (chat, completions): the key, then a non-empty string
_TEXT = re.compile(rb'"(?:content|text)":"[^"]')


def block_ids(token_ids: Sequence[int], salt: bytes = b"", unit: int = BLOCK) -> list[int]:
    """Chained ids of the prompt's ``unit``-token blocks (the last one possibly partial)."""
    out: list[int] = []
    prev = salt
    for i in range(0, len(token_ids), unit):
        h = hashlib.blake2b(prev + array("I", (t & 0xFFFFFFFF for t in token_ids[i:i + unit])).tobytes(),
                            digest_size=8).digest()
        out.append(int.from_bytes(h, "big") & _MASK)
        prev = h
    return out


class TraceRecord(msgspec.Struct, frozen=True):
    """One line of a captured trace (Mooncake's fields first)."""

    timestamp: float
    input_length: int
    output_length: int
    hash_ids: list[int]
    time: float
    model: str


@dataclass(slots=True)
class OutputCounter:
    """Counts a response's generated tokens from its body chunks, without buffering the body."""

    usage: int | None = None  # ``usage.completion_tokens`` when the response carried it (authoritative)
    chunks: int = 0  # streamed chunks carrying text (one token each), the fallback
    _carry: bytes = field(default=b"")

    def feed(self, chunk: bytes) -> None:
        """One body chunk, in order."""
        carry = self._carry
        data = carry + chunk
        found = _USAGE.findall(data)
        if found:
            self.usage = int(found[-1])
        # a match ending inside the carry was counted with the previous chunk: count only those ending here
        self.chunks += sum(1 for m in _TEXT.finditer(data) if m.end() > len(carry))
        self._carry = data[-_CARRY:]

    @property
    def tokens(self) -> int:
        """The best count available."""
        return self.usage if self.usage is not None else max(self.chunks, 0)


@dataclass(slots=True)
class Pending:
    """What is known of one routed request until it finishes."""

    arrival: float
    model: str
    input_length: int
    hash_ids: list[int]
    status: int = 0
    output: OutputCounter = field(default_factory=OutputCounter)


def record_of(p: Pending, start: float) -> TraceRecord | None:
    """The trace line of a finished request, or None when it is not replayable (failed, or nothing generated)."""
    if p.status != 200 or p.input_length < 1 or p.output.tokens < 1:
        return None
    # (never negative: a wall clock stepped back wrote one, and the loader refuses a whole file for one line)
    return TraceRecord(timestamp=max(0.0, round((p.arrival - start) * 1000.0, 3)), input_length=p.input_length,
                       output_length=p.output.tokens, hash_ids=p.hash_ids, time=round(p.arrival, 6), model=p.model)


def _repaired(fh: IO[bytes]) -> int:
    """The size of the capture open in ``fh`` once a last line left unfinished is cut off."""
    size = fh.seek(0, 2)
    if size == 0:
        return 0
    with open(fh.name, "rb") as reader:
        reader.seek(max(0, size - 1))
        if reader.read(1) == b"\n":
            return size
        tail = max(0, size - (1 << 20))  # a line is far shorter than a MiB
        reader.seek(tail)
        keep = tail + reader.read().rfind(b"\n") + 1  # 0 when no line of it is whole
    fh.truncate(keep)
    log.warning("trace capture %s: an unfinished last line (a picker killed while writing it) cut off", fh.name)
    return keep


def _first_start(path: Path) -> float:
    """The run start the file's first record was counted from (its wall time less its timestamp)."""
    with path.open("rb") as reader:
        first = reader.readline(1 << 20)
    try:
        rec = msgspec.json.decode(first, type=TraceRecord)
        return rec.time - rec.timestamp / 1000.0
    except (msgspec.DecodeError, msgspec.ValidationError) as err:
        raise ValueError(f"{path}: its first line is not a capture record ({err}): capture to another file") from None


class TraceWriter:
    """Appends records to a JSONL file (one line each, flushed: a killed picker loses at most a line).

    A file that already holds a capture is continued, not restarted: a line a killed picker left unfinished is cut
    off (it made the whole file unreadable, and the next line appended to it too), and timestamps go on from the
    file's first record (each run counted from its own start: replayed, two runs hours apart overlaid at time 0). A
    file stops growing at ``MAX_CAPTURE_BYTES``, the most a replay reads."""

    def __init__(self, path: Path, start: float, salt: bytes = b"") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.salt = salt
        self.written = 0
        self.skipped = 0
        self.failed = 0  # lines lost to write errors
        self.dropped = 0  # lines past MAX_CAPTURE_BYTES
        self._fh: IO[bytes] = path.open("ab")
        try:
            self.size = _repaired(self._fh)
            self.start = _first_start(path) if self.size else start
        except BaseException:
            self._fh.close()
            raise
        self._enc = msgspec.json.Encoder()

    def begin(self, arrival: float, model: str, token_ids: Sequence[int]) -> Pending:
        """A request was routed."""
        return Pending(arrival, model, len(token_ids), block_ids(token_ids, self.salt))

    def finish(self, p: Pending) -> None:
        """The request ended: write its line (or count it as skipped)."""
        rec = record_of(p, self.start)
        if rec is None:
            self.skipped += 1
            return
        line = self._enc.encode(rec) + b"\n"
        if self.size + len(line) > MAX_CAPTURE_BYTES:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("trace capture to %s is full (%d MiB, the most a replay reads): lines are dropped",
                            self.path, MAX_CAPTURE_BYTES >> 20)
            return
        try:
            self._fh.write(line)
            self._fh.flush()
            self.size += len(line)
        except (OSError, ValueError) as err:  # a full disk (or a closed file) must not break routing
            self.failed += 1
            if self.failed == 1:
                log.warning("trace capture to %s failed (%s); routing goes on, lines are dropped", self.path, err)
            return
        self.written += 1

    def close(self) -> None:
        """Close the file."""
        try:
            self._fh.close()
        except OSError as err:
            log.warning("closing the trace %s failed: %s", self.path, err)
