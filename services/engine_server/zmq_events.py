"""KV-cache events on a ZMQ PUB socket in vLLM's own wire format, for third-party routers.

vLLM's ``ZmqEventPublisher`` (v0.33) sends each batch as a three-frame message: the topic, an 8-byte
big-endian sequence number, and the msgpack-encoded ``KVEventBatch`` (``shared.core.kv_events.encode_batch``
writes exactly that). PUB sockets drop messages a slow subscriber cannot take (the sequence shows the gap).
pyzmq is optional: without it, asking for ZMQ events is a start-up error with one clear line.
"""

from __future__ import annotations

import contextlib
from typing import Any

from shared.core.kv_events import KVEventBatch, encode_batch


class ZmqKVPublisher:
    """Binds a PUB socket and sends KV batches in vLLM's framing."""

    def __init__(self, endpoint: str, topic: str = "") -> None:
        try:
            import zmq
        except ImportError as err:  # pragma: no cover - depends on the install
            raise ValueError("--kv-events-zmq needs pyzmq (pip install pyzmq)") from err
        self._zmq: Any = zmq
        self._sock: Any = zmq.Context.instance().socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as err:
            self._sock.close()
            raise ValueError(f"--kv-events-zmq: cannot bind {endpoint}: {err}") from err
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.topic = topic.encode()
        self.seq = 0

    def publish(self, batch: KVEventBatch) -> None:
        """Send one batch now (never blocks: a full queue drops it, and the numbering shows the gap)."""
        seq = self.seq
        self.seq += 1
        with contextlib.suppress(self._zmq.Again):
            self._sock.send_multipart([self.topic, seq.to_bytes(8, "big"), encode_batch(batch)],
                                      flags=self._zmq.NOBLOCK)

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()
