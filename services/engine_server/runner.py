"""Drives one :class:`Engine` in real time: sleeps ``t_step / speedup`` per step, streams tokens out.

The engine's clock is model time: ``(monotonic − start) × speedup``. Requests, aborts and metrics reads
happen between steps, never inside one (aborts that arrive mid-step are applied after it).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.engine_server.prometheus import RequestHistograms
from shared.core.engine import Engine, FinishReason, Request, RequestStatus

MAX_LAG_S = 0.010


@dataclass(slots=True)
class StreamItem:
    """New tokens for one request, and its finish reason once it is done."""

    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | None = None


@dataclass(slots=True)
class Stream:
    """A client's view of one request."""

    req: Request
    queue: asyncio.Queue[StreamItem] = field(default_factory=asyncio.Queue)
    last_token_time: float = -1.0
    done: bool = False


class EngineRunner:
    """Owns the engine, the per-request streams and the latency histograms."""

    def __init__(self, engine: Engine, speedup: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        if speedup <= 0:
            raise ValueError("speedup must be > 0")
        self.engine = engine
        self.speedup = speedup
        self.clock = clock
        self.t0 = clock()
        self.streams: dict[str, Stream] = {}
        self.hists = RequestHistograms()
        self._wake = asyncio.Event()
        self._aborts: list[Request] = []
        self._task: asyncio.Task[None] | None = None
        self._next_uid = 0

    def model_now(self) -> float:
        """Current model time (seconds since start, times ``speedup``)."""
        return (self.clock() - self.t0) * self.speedup

    def start(self) -> None:
        """Start the step loop on the running event loop."""
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="engine-loop")

    async def stop(self) -> None:
        """Stop the step loop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def submit(self, req: Request) -> Stream:
        """Enqueue ``req`` arriving now; raises ValueError if the engine cannot serve it."""
        req.arrival_time = self.model_now()
        req.uid = self._next_uid
        self._next_uid += 1
        self.engine.add_request(req)
        st = Stream(req)
        self.streams[req.req_id] = st
        self._wake.set()
        return st

    def abort(self, req: Request) -> None:
        """The client went away: drop the request after the current step."""
        st = self.streams.get(req.req_id)
        if st is None or st.done:
            return
        self._aborts.append(req)
        self._wake.set()

    async def _loop(self) -> None:
        eng = self.engine
        while True:
            if self._aborts:
                self._apply_aborts()
            if not eng.has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            # Busy steps chain back to back in model time and the sleeps aim at absolute deadlines, so timer
            # overshoot is caught up on the next step; only a loop that falls behind by more than
            # MAX_LAG_S of wall time (overload) resynchronises, and then its steps honestly start late.
            now = self.model_now()
            if eng.now < now - MAX_LAG_S * self.speedup:
                eng.now = now
            start = eng.now
            out, d = eng.schedule_step()
            delay = self.t0 + (start + d) / self.speedup - self.clock()
            await asyncio.sleep(delay if delay > 0 else 0)
            finished = eng.finish_step(out, start, d)
            self._emit(out.sampling, start + d)
            for req in finished:
                self._close(req)

    def _emit(self, sampled: list[Request], t: float) -> None:
        streams, hists = self.streams, self.hists
        for req in sampled:
            st = streams.get(req.req_id)
            if st is None or req.status not in (RequestStatus.RUNNING, RequestStatus.FINISHED):
                continue
            toks = req.all_token_ids
            assert toks is not None
            st.queue.put_nowait(StreamItem([toks[-1]]))
            if st.last_token_time < 0:
                hists.ttft.observe(t - req.arrival_time)
                hists.queue.observe(req.queue_time)
            else:
                hists.itl.observe(t - st.last_token_time)
            st.last_token_time = t

    def _close(self, req: Request) -> None:
        st = self.streams.pop(req.req_id, None)
        if st is None:
            return
        st.done = True
        reason = req.finish_reason or FinishReason.LENGTH
        st.queue.put_nowait(StreamItem([], reason.value, req.stop_reason))
        if reason is not FinishReason.ABORT:
            self.hists.e2e.observe(req.e2e)
            self.hists.prompt_len.observe(req.prompt_len)
            self.hists.output_len.observe(req.num_output_tokens)

    def _apply_aborts(self) -> None:
        aborts, self._aborts = self._aborts, []
        now = max(self.engine.now, self.model_now())
        for req in aborts:
            self.engine.scheduler.abort(req, now)
            self._close(req)
