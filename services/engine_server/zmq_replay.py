"""The ZMQ replay endpoint (``--kv-events-replay-endpoint``): a ROUTER socket answering replay requests in vLLM's
protocol (``kv_replay``), served as a task on the server's event loop beside the step loop.

Nothing here can hold the loop: each pass reads at most ``REQUESTS_PER_PASS`` requests and sends at most
``SENDS_PER_PASS`` messages, every send is non-blocking, and the task yields between passes. The socket is a
ROUTER with ``ROUTER_MANDATORY``: a send to a requester whose queue is full fails (rather than being dropped
silently, as a plain ROUTER does, which would leave a hole in the middle of a replay), so its replay waits and is
retried every ``RETRY_S`` until the requester reads or ``ReplayDesk.stall_s`` passes; a send to one that has gone
fails too. ``MAXMSGSIZE`` makes ZMQ disconnect a peer sending a frame larger than any request has.

A ZMQ socket's file descriptor only says "something changed": the socket's events are read after each pass, and a
request that arrived meanwhile is served in the next pass without waiting for the descriptor.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from services.engine_server.kv_replay import ReplayDesk
from services.engine_server.zmq_events import bound_socket

REQUESTS_PER_PASS = 16
SENDS_PER_PASS = 32  # ~0.2 ms of CPU (bench/zmq_replay.py): the most a step waits for a pass
RETRY_S = 0.05  # how often a replay whose requester's queue is full is tried again
MAX_FRAME_BYTES = 1024  # a request's frames are 0 and 8 bytes; the handshake carries the routing id (ZMTP: up to 255)


class ZmqReplayServer:
    """Binds the replay ROUTER socket and answers requests as ``desk`` decides, until cancelled."""

    def __init__(self, endpoint: str, desk: ReplayDesk) -> None:
        zmq, sock, bound = bound_socket("ROUTER", endpoint, "--kv-events-replay-endpoint",
                                        {"ROUTER_MANDATORY": 1, "MAXMSGSIZE": MAX_FRAME_BYTES})
        self._zmq: Any = zmq
        self._sock: Any = sock
        self.endpoint: str = bound
        self.desk = desk

    async def run(self) -> None:
        """Serve requests until cancelled."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        fd = self._sock.getsockopt(self._zmq.FD)
        loop.add_reader(fd, wake.set)
        try:
            while True:
                wake.clear()
                if self._pass(loop.time()):
                    await asyncio.sleep(0)  # more to do: let the step loop run first
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), RETRY_S if self.desk.any_blocked else None)
        finally:
            loop.remove_reader(fd)

    def _pass(self, now: float) -> bool:
        """Read some requests, send some replay messages; whether there is more to do at once."""
        zmq, sock, desk = self._zmq, self._sock, self.desk
        for _ in range(REQUESTS_PER_PASS):
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            if (reply := desk.take(frames, now)) is not None:
                with contextlib.suppress(zmq.ZMQError):  # full or gone: a refused requester is owed nothing more
                    sock.send_multipart(reply, flags=zmq.NOBLOCK)
        budget = SENDS_PER_PASS
        for replay in desk.in_progress():
            while budget and (message := replay.next_frames()) is not None:
                try:
                    sock.send_multipart(message, flags=zmq.NOBLOCK)
                except zmq.Again:  # its queue is full: try again later
                    desk.blocked(replay, now)
                    break
                except zmq.ZMQError:  # EHOSTUNREACH: it disconnected
                    desk.gone(replay)
                    break
                replay.advance()
                budget -= 1
            if replay.done:
                desk.finished(replay)
        desk.expire(now)
        return not budget or bool(sock.getsockopt(zmq.EVENTS) & zmq.POLLIN)

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()
