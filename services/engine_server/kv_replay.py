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
- a replay covers the batches kept when it was asked (not those published later), read from the buffer as the
  requester takes them: no copy is made, so a request costs the same whatever the buffer's size; a batch evicted
  before its turn is skipped, and the jump in the numbers shows the requester what it lost;
- one whose requester has not taken a message for ``stall_s`` (its queue stays full), has gone, or is still
  running after ``max_replay_s`` (a requester reading just fast enough not to stall) is dropped, ``abandoned``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

END_SEQ = (-1).to_bytes(8, "big", signed=True)
"""The sequence frame that ends a replay (its payload frame is empty)."""

REPLAY_BUFFER_BATCHES = 10_000
"""Batches kept for replay unless told otherwise: vLLM's ``buffer_steps`` default."""

MAX_REPLAY_BUFFER_BATCHES = 1_000_000
"""The most ``--kv-events-replay-buffer`` accepts: 100 × vLLM's default, already ~1.3 GB of 16-stream batches and
more at higher concurrency (the bound is in batches, not bytes); ten million would let a typo take ~13 GB."""

MAX_REPLAYS = 8
"""Replays in progress at once (each holds its requester's identity and two numbers)."""

STALL_S = 10.0
"""A replay whose requester took nothing for this long is dropped (a requester that never reads)."""

MAX_REPLAY_S = 120.0
"""A replay still running after this long is dropped: a requester that reads just often enough not to stall would
otherwise hold its place for hours (a 1,000,000-batch replay at 50 messages a second), and eight of them every
place. A reader at full speed takes well under a second for vLLM's default 10,000 batches."""

MALFORMED, BUSY, ABANDONED = "malformed", "busy", "abandoned"
REFUSAL_REASONS = (MALFORMED, BUSY, ABANDONED)


class ReplayBuffer:
    """The last ``capacity`` published batch payloads, numbered from 0 in the order added (as the PUB socket's
    sequence frame numbers them): a ring of slots, batch ``n`` in slot ``n % capacity``, so adding one and reading
    any kept one are O(1) (a deque is O(n) to index in the middle)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a replay buffer holds at least 1 batch, got {capacity}")
        self._slots: list[bytes] = [b""] * capacity
        self.next_seq = 0  # the number the next batch added gets

    def add(self, payload: bytes) -> None:
        """Keep the next batch (called once per published batch on the step loop: O(1), no copy)."""
        self._slots[self.next_seq % len(self._slots)] = payload
        self.next_seq += 1

    @property
    def first_seq(self) -> int:
        """The number of the oldest batch kept (``next_seq`` when none is)."""
        return max(self.next_seq - len(self._slots), 0)

    def get(self, seq: int) -> bytes:
        """Batch ``seq``, which must be kept (``first_seq <= seq < next_seq``)."""
        if not self.first_seq <= seq < self.next_seq:
            raise IndexError(f"batch {seq} is not kept (kept: {self.first_seq} to {self.next_seq - 1})")
        return self._slots[seq % len(self._slots)]


@dataclass(eq=False)
class Replay:
    """One requester's answer: the batches numbered ``cursor`` up to (not including) ``end`` that are still kept
    when their turn comes, read from ``buffer``, then the end marker."""

    identity: bytes
    buffer: ReplayBuffer
    cursor: int  # the number of the next batch to send
    end: int  # the buffer's next number when asked: batches published later are not part of this replay
    started: float
    blocked_since: float | None = None  # when a send first found its queue full (None: the last send went out)
    done: bool = False  # the end marker went out

    def next_frames(self) -> list[bytes] | None:
        """The ROUTER frames of the next message to send, None once the end marker went out."""
        if self.done:
            return None
        self.cursor = max(self.cursor, self.buffer.first_seq)  # evicted before their turn: the jump shows the loss
        if self.cursor < self.end:
            return [self.identity, b"", self.cursor.to_bytes(8, "big"), self.buffer.get(self.cursor)]
        return [self.identity, b"", END_SEQ, b""]

    def advance(self) -> None:
        """The message ``next_frames`` gave went out."""
        if self.cursor < self.end:
            self.cursor += 1
        else:
            self.done = True
        self.blocked_since = None


@dataclass
class ReplayDesk:
    """Admits replay requests, hands out the replays in progress and drops those abandoned; counts both."""

    buffer: ReplayBuffer
    max_replays: int = MAX_REPLAYS
    stall_s: float = STALL_S
    max_replay_s: float = MAX_REPLAY_S
    replays: int = field(default=0, init=False)  # requests answered with a replay (one of no batches included)
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REFUSAL_REASONS, 0), init=False)
    _running: dict[bytes, Replay] = field(default_factory=dict, init=False, repr=False)  # by requester, in order
    _turn: int = field(default=0, init=False, repr=False)

    def take(self, frames: list[bytes], now: float) -> list[bytes] | None:
        """One message the ROUTER received at ``now``. Starts a replay and returns None, or returns the end marker to
        send once to a refused requester (None too when there is no one to answer or answering would mislead)."""
        if not frames:
            return self._refuse(MALFORMED, None)
        identity = frames[0]
        start = _start(frames, self.buffer.next_seq)
        running = identity in self._running  # then no answer: an end marker would read as the end of its replay
        if start is None:
            return self._refuse(MALFORMED, None if running else identity)
        if running or len(self._running) >= self.max_replays:
            return self._refuse(BUSY, None if running else identity)
        self._running[identity] = Replay(identity, self.buffer, start, self.buffer.next_seq, started=now)
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
        """Drop the replays whose requester has taken nothing for ``stall_s``, and those running ``max_replay_s``."""
        for replay in [r for r in self._running.values()
                       if (r.blocked_since is not None and now - r.blocked_since >= self.stall_s)
                       or now - r.started >= self.max_replay_s]:
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
