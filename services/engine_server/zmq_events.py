"""KV-cache events on a ZMQ PUB socket in vLLM's own wire format, for third-party routers.

vLLM's ``ZmqEventPublisher`` (v0.33) sends each batch as a three-frame message: the topic, an 8-byte
big-endian sequence number, and the msgpack-encoded ``KVEventBatch`` (``shared.core.kv_events.encode_batch``
writes exactly that). A subscriber too slow to take a batch (its queue at the high-water mark) misses it and
sees the gap in the sequence; the others still get it.
pyzmq is optional: without it, asking for ZMQ events is a start-up error with one clear line.

The socket is an XPUB (a SUB peer sees a PUB): a plain PUB drops for a full subscriber without telling the
sender, so nothing could count it. With ``XPUB_NODROP`` a send that a full subscriber cannot take fails at once
(no frame leaves); only then is the overflow counted and the batch sent again lossily, as a PUB would, so the
subscribers with room get it. ZMQ then sets the full subscriber aside: it misses every batch until it has read
part of its queue back (libzmq's low-water mark), and those sends succeed. So ``overflows`` counts each time a
subscriber fell behind (each is at least one missed batch; how many is only visible in its sequence gap). The
normal path is one send, as before.

With a replay endpoint (``zmq_replay``), each batch sent is also kept, the same bytes, in a bounded
``ReplayBuffer``: a subscriber that sees a gap asks for what it missed there.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from services.engine_server.kv_replay import ReplayBuffer
from shared.core.kv_events import KVEventBatch, encode_batch

log = logging.getLogger("gantry.engine_server")

SUBSCRIPTIONS_DRAINED_EVERY = 1024
"""An XPUB queues every new topic subscription (and last unsubscription) for its owner to read; read and
discard them once per this many batches so that subscribers coming and going do not grow that queue for ever."""


def bound_socket(kind: str, endpoint: str, flag: str, options: dict[str, int]) -> tuple[Any, Any, str]:
    """pyzmq, a socket of ``kind`` (``"XPUB"``, ``"ROUTER"``) with LINGER 0 and ``options`` (names of ZMQ
    options) bound to ``endpoint``, and the endpoint it bound (a ``*`` port resolved). Without pyzmq, or when the
    bind fails, a ``ValueError`` naming the server's ``flag``: a start-up error of one line."""
    try:
        import zmq
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ValueError(f"{flag} needs pyzmq (pip install pyzmq)") from err
    sock: Any = zmq.Context.instance().socket(getattr(zmq, kind))
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name), value)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as err:
        sock.close()
        raise ValueError(f"{flag}: cannot bind {endpoint}: {err}") from err
    return zmq, sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)


class ZmqKVPublisher:
    """Binds a PUB-compatible socket and sends KV batches in vLLM's framing; counts subscribers falling behind."""

    def __init__(self, endpoint: str, topic: str = "", replay: ReplayBuffer | None = None) -> None:
        zmq, sock, bound = bound_socket("XPUB", endpoint, "--kv-events-zmq", {"XPUB_NODROP": 1})
        self._zmq: Any = zmq
        self._sock: Any = sock
        self.endpoint: str = bound
        self.topic = topic.encode()
        self.seq = 0
        self.overflows = 0  # times a subscriber's queue was full when a batch was sent
        self.replay = replay  # keeps each batch sent for the replay endpoint (numbered as the sequence frame)

    def publish(self, batch: KVEventBatch) -> None:
        """Send one batch now (never blocks: a subscriber whose queue is full misses it, and the numbering shows
        it the gap)."""
        payload = encode_batch(batch)
        seq = self.seq
        # numbered and kept together, before the send (which may raise): the replay's numbers stay the PUB's
        self.seq += 1
        if self.replay is not None:
            self.replay.add(payload)
        frames = [self.topic, seq.to_bytes(8, "big"), payload]
        try:
            self._sock.send_multipart(frames, flags=self._zmq.NOBLOCK)
        except self._zmq.Again:
            self._send_lossy(frames)
        if not seq % SUBSCRIPTIONS_DRAINED_EVERY:
            self._drain_subscriptions()

    def _send_lossy(self, frames: list[bytes]) -> None:
        """A subscriber's queue is full: count it and send as a PUB does (to those with room)."""
        self.overflows += 1
        if self.overflows & (self.overflows - 1) == 0:  # the 1st, 2nd, 4th...: not a line a step
            log.warning("ZMQ KV events: a subscriber's queue was full (%d times so far): it misses batches until it "
                        "catches up", self.overflows)
        zmq, sock = self._zmq, self._sock
        sock.setsockopt(zmq.XPUB_NODROP, 0)
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK)
        finally:
            sock.setsockopt(zmq.XPUB_NODROP, 1)

    def _drain_subscriptions(self) -> None:
        with contextlib.suppress(self._zmq.Again):
            while True:
                self._sock.recv(flags=self._zmq.NOBLOCK)

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()
