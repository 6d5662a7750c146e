"""What the ZMQ replay endpoint answers, decided without a socket (no I/O, no clock: time is a parameter).

vLLM's replay protocol (``ZmqEventPublisher`` in vllm/distributed/kv_events.py, its ``replay_endpoint`` and
``buffer_steps`` options): a ROUTER socket keeps the last ``buffer_steps`` (default 10,000) published batches. A
requester (a DEALER that sends an empty delimiter first; a REQ adds one itself but then reads only the first
message of the answer) sends one frame, the first sequence number it wants as 8 big-endian bytes; the ROUTER
sees ``[identity, b"", start]``. The answer is one message per kept batch numbered ``start`` or later,
``[seq (8 big-endian bytes), msgpack batch]`` (the payload the PUB socket sent), then the end marker
``[-1 as 8 signed big-endian bytes, b""]``. A batch no longer kept is simply not there: the first number of the
answer shows the requester what it lost for good.

Beyond vLLM, because the answer is served on the server's event loop beside the step loop (vLLM serves it on its
publisher thread, one request at a time, and ignores a request that is not three frames):

- a request that is not exactly three frames with an empty delimiter and an 8-byte number, or that asks for a
  negative number or one past the next to be published, gets the end marker alone and is counted ``malformed``
  (vLLM reads any length as an unsigned number, so a "negative" one replays nothing: the same answer);
- at most ``max_replays`` replays run at once, each requester at most one: other requests get the end marker,
  ``busy``; a request (valid or not) from a requester whose replay runs is counted but not answered, as an end
  marker would read as the end of that replay;
- a replay is a snapshot of the kept batches when asked, sent as the requester reads; one whose requester has not
  taken a message for ``stall_s`` (its queue stays full) or has gone is dropped, ``abandoned``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from itertools import islice

END_SEQ = (-1).to_bytes(8, "big", signed=True)
"""The sequence frame that ends a replay (its payload frame is empty)."""

REPLAY_BUFFER_BATCHES = 10_000
"""Batches kept for replay unless told otherwise: vLLM's ``buffer_steps`` default."""

MAX_REPLAY_BUFFER_BATCHES = 1_000_000
"""The most ``--kv-events-replay-buffer`` accepts: 100 × vLLM's default, already ~1.3 GB of 16-stream batches and
more at higher concurrency (the bound is in batches, not bytes); ten million would let a typo take ~13 GB."""

MAX_REPLAYS = 8
"""Replays in progress at once: each holds a snapshot of up to the whole buffer (references, 64 bytes a batch)."""

STALL_S = 10.0
"""A replay whose requester took nothing for this long is dropped (a requester that never reads)."""

MALFORMED, BUSY, ABANDONED = "malformed", "busy", "abandoned"
REFUSAL_REASONS = (MALFORMED, BUSY, ABANDONED)


class ReplayBuffer:
    """The last ``capacity`` published batch payloads, numbered from 0 in the order added (as the PUB socket's
    sequence frame numbers them)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a replay buffer holds at least 1 batch, got {capacity}")
        self.capacity = capacity
        self._payloads: deque[bytes] = deque(maxlen=capacity)
        self.next_seq = 0  # the number the next batch added gets

    def add(self, payload: bytes) -> None:
        """Keep the next batch (called once per published batch on the step loop: O(1), no copy)."""
        self._payloads.append(payload)
        self.next_seq += 1

    def since(self, start: int) -> tuple[int, list[bytes]]:
        """The kept batches numbered ``start`` or later, oldest first, and the number of the first of them (a copy
        of references: ~70 µs for 10,000 batches, where pairing each with its number took 0.6 ms)."""
        first = self.next_seq - len(self._payloads)
        skip = min(max(start - first, 0), len(self._payloads))
        return first + skip, list(islice(self._payloads, skip, None))


@dataclass(eq=False)
class Replay:
    """One requester's answer: its snapshot of batches (numbered from ``first``), then the end marker; ``sent``
    messages went out."""

    identity: bytes
    first: int
    payloads: list[bytes]
    sent: int = 0
    blocked_since: float | None = None  # when a send first found its queue full (None: the last send went out)

    def next_frames(self) -> list[bytes] | None:
        """The ROUTER frames of the next message to send, None once the end marker went out."""
        i = self.sent
        if i < len(self.payloads):
            return [self.identity, b"", (self.first + i).to_bytes(8, "big"), self.payloads[i]]
        return [self.identity, b"", END_SEQ, b""] if i == len(self.payloads) else None

    def advance(self) -> None:
        """The message ``next_frames`` gave went out."""
        self.sent += 1
        self.blocked_since = None

    @property
    def done(self) -> bool:
        """Whether the end marker went out."""
        return self.sent > len(self.payloads)


@dataclass
class ReplayDesk:
    """Admits replay requests, hands out the replays in progress and drops those abandoned; counts both."""

    buffer: ReplayBuffer
    max_replays: int = MAX_REPLAYS
    stall_s: float = STALL_S
    replays: int = field(default=0, init=False)  # requests answered with a replay (one of no batches included)
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REFUSAL_REASONS, 0), init=False)
    _running: dict[bytes, Replay] = field(default_factory=dict, init=False, repr=False)  # by requester, in order
    _turn: int = field(default=0, init=False, repr=False)

    def take(self, frames: list[bytes]) -> list[bytes] | None:
        """One message the ROUTER received. Starts a replay and returns None, or returns the end marker to send
        once to a refused requester (None too when there is no one to answer or answering would mislead)."""
        if not frames:
            return self._refuse(MALFORMED, None)
        identity = frames[0]
        start = _start(frames, self.buffer.next_seq)
        running = identity in self._running  # then no answer: an end marker would read as the end of its replay
        if start is None:
            return self._refuse(MALFORMED, None if running else identity)
        if running or len(self._running) >= self.max_replays:
            return self._refuse(BUSY, None if running else identity)
        self._running[identity] = Replay(identity, *self.buffer.since(start))
        self.replays += 1
        return None

    def in_progress(self) -> list[Replay]:
        """The replays to send, starting with a different one each call (so one long replay does not take every
        pass's send budget)."""
        running = list(self._running.values())
        if not running:
            return running
        self._turn = (self._turn + 1) % len(running)
        return running[self._turn:] + running[:self._turn]

    def finished(self, replay: Replay) -> None:
        """Its end marker went out."""
        self._running.pop(replay.identity, None)

    def blocked(self, replay: Replay, now: float) -> None:
        """A send found the requester's queue full (it is not reading)."""
        if replay.blocked_since is None:
            replay.blocked_since = now

    def gone(self, replay: Replay) -> None:
        """The requester disconnected before its replay ended."""
        if self._running.pop(replay.identity, None) is not None:
            self.refused[ABANDONED] += 1

    def expire(self, now: float) -> None:
        """Drop the replays whose requester has taken nothing for ``stall_s``."""
        for replay in [r for r in self._running.values()
                       if r.blocked_since is not None and now - r.blocked_since >= self.stall_s]:
            self.gone(replay)

    @property
    def any_blocked(self) -> bool:
        """Whether a replay waits for its requester to read (the socket has to retry it later)."""
        return any(r.blocked_since is not None for r in self._running.values())

    def _refuse(self, reason: str, identity: bytes | None) -> list[bytes] | None:
        self.refused[reason] += 1
        return None if identity is None else [identity, b"", END_SEQ, b""]


def _start(frames: list[bytes], next_seq: int) -> int | None:
    """The first number a request asks for, None if it is not a valid one."""
    if len(frames) != 3 or frames[1] or len(frames[2]) != 8:
        return None
    start = int.from_bytes(frames[2], "big", signed=True)
    return start if 0 <= start <= next_seq else None
