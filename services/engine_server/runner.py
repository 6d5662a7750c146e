"""Drives one :class:`Engine` in real time: each step lasts ``t_step / speedup``, then its tokens stream out.

The engine's clock is model time: ``(monotonic − start) × speedup``. Requests, aborts and metrics reads
happen between steps, never inside one (aborts that arrive mid-step are applied after it). A request that
arrives while a step is in flight joins the next step at the earliest, which starts when the in-flight one
ends; if the loop is late (the in-flight step's end has passed in wall time), the request arrives, in the
engine's clock, at that end: the engine's clock is then behind the wall clock and says so (lag metric).

Steps are a chain of event-loop timer callbacks: a step is scheduled, a timer is armed for its end, and
that callback emits the step's tokens and schedules the next step at once, so a busy engine costs one
event-loop wake-up per step and no task, future or sleep. Tokens leave in one pass per step: the callback
hands each sampled token to its stream's :class:`TokenSink`, which (for an HTTP stream) writes the
pre-encoded SSE chunk straight to the connection. No task wakes up per token; the HTTP handler of a stream
wakes once at the start and once at the end.

When the process cannot keep up (CPU-starved, or too many streams), steps end later in wall time than the
model says: the **emulated-clock lag** (wall time of a step's token emission minus its model deadline) is
recorded, and a warning is logged when a step falls more than ``MAX_LAG_S`` behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from services.engine_server.figures import ClockLag, RequestHistograms
from shared.core.engine import Engine, FinishReason, Request, RequestStatus, StepOutput

log = logging.getLogger("gantry.engine_server")

MAX_LAG_S = 0.100
"""Wall seconds the loop may trail the emulated clock and still catch up (running the late steps back to back,
so the average token rate stays the model's); beyond it the chain restarts at 'now' and that time is lost."""
WARN_EVERY_S = 10.0


class TokenSink(Protocol):
    """Where one request's tokens go (an HTTP stream, a collector, a test)."""

    def token(self, token_id: int) -> bool:
        """Take one sampled token; False when the consumer is gone (the request is then aborted)."""
        ...

    def finish(self, req: Request, reason: str, stop_reason: int | None) -> None:
        """The request ended (stop, length or abort)."""
        ...


@dataclass(slots=True)
class CollectSink:
    """Collects a request's tokens and resolves ``done`` at the end (non-streaming responses, tests)."""

    token_ids: list[int] = field(default_factory=list)
    done: asyncio.Future[tuple[str, int | None]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())

    def token(self, token_id: int) -> bool:
        """Keep the token."""
        self.token_ids.append(token_id)
        return True

    def finish(self, req: Request, reason: str, stop_reason: int | None) -> None:
        """Resolve ``done`` with the finish and stop reasons."""
        if not self.done.done():
            self.done.set_result((reason, stop_reason))


@dataclass(slots=True)
class Stream:
    """One request in flight and where its tokens go."""

    req: Request
    sink: TokenSink
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
        self.lag = ClockLag()
        self._aborts: list[Request] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.Handle | None = None  # the one callback pending: a step's end, a wake-up or a kick
        self._step: tuple[StepOutput, float, float, float, float] | None = None  # in flight: out, start, d, ...
        self._parked = False  # nothing could run although requests wait (remote KV): the clock catches up on wake
        self._idle_wakeup: float | None = None  # while parked: when the next KV transfer completes (model time)
        self._next_uid = 0
        self._in_flight_end = -1.0  # model time the in-flight step ends; -1 while no step is in flight
        self._prev_end = -1.0  # model time the previous step's tokens went out
        self.on_flush: list[Callable[[], None]] = []  # run after each step's tokens were handed to the sinks
        self.on_close: Callable[[Request, str, float], None] | None = None  # (request, finish, end in model time)

    def model_now(self) -> float:
        """Current model time (seconds since start, times ``speedup``)."""
        return (self.clock() - self.t0) * self.speedup  # also inline in _begin (of a reading it has): change both

    def start(self) -> None:
        """Start stepping on the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._kick()

    async def stop(self) -> None:
        """Stop stepping (a step in flight is dropped: its tokens never go out)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._loop = None
        self._step = None
        self._parked = False
        self._in_flight_end = -1.0

    def submit(self, req: Request, sink: TokenSink) -> Stream:
        """Enqueue ``req`` arriving now; raises ValueError if the engine cannot serve it."""
        now = self.model_now()
        end = self._in_flight_end
        req.arrival_time = end if 0 <= end < now else now  # never before the step it can first join
        req.uid = self._next_uid
        self.engine.add_request(req)
        self._next_uid += 1
        st = Stream(req, sink)
        self.streams[req.req_id] = st
        self._kick()
        return st

    def abort(self, req: Request) -> None:
        """The client went away: drop the request after the current step."""
        st = self.streams.get(req.req_id)
        if st is None or st.done:
            return
        self._aborts.append(req)
        self._kick()

    # -- the step chain ---------------------------------------------------------------------------------
    # One callback per step, at its end: the end of a step emits its tokens and starts the next one at once.
    # No task or future per step: a wake-up of the event loop costs tens of µs of CPU on a shared VM, and an
    # asyncio.sleep added a task switch and a future on top of the timer.
    def _kick(self) -> None:
        """Work may have arrived: start a step soon unless one is in flight or already due."""
        loop = self._loop
        if loop is None or self._step is not None:
            return
        handle = self._handle
        if handle is not None:
            if not self._parked:
                return  # a kick is already pending
            handle.cancel()  # parked on a KV transfer: a new request may run before it completes
        self._handle = loop.call_soon(self._wake_up)

    def _wake_up(self) -> None:
        """End of an idle wait (a request came, or a KV transfer completed): catch the clock up, then step."""
        self._handle = None
        if self._parked:
            self._parked = False
            wakeup, self._idle_wakeup = self._idle_wakeup, None
            now = self.model_now()
            eng = self.engine
            target = now if wakeup is None else min(now, wakeup)
            if target > eng.now:
                eng.now = target
        self._begin()

    def _begin(self, wall: float = -1.0) -> None:
        """Apply aborts, then schedule the next step and arm the timer for its end (or go idle). ``wall``: the
        clock read just now by the caller (the previous step's end), so the step needs no reading of its own."""
        if self._aborts:
            self._apply_aborts()
            wall = -1.0  # that took time
        eng = self.engine
        if not eng.has_work() and not eng.scheduler.sending:
            return  # idle until submit() kicks
        # (a prefill server's last hand-offs still hold their KV blocks until sent: the steps below free them when
        # the transfer ends, then park; idle at once, they stayed held, the reported usage stale, until a request)
        # Busy steps chain back to back in model time and the timers aim at absolute deadlines, so timer
        # overshoot is caught up on the next step; only a loop that falls behind by more than MAX_LAG_S of
        # wall time (overload) resynchronises, and then its steps honestly start late.
        w0 = self.clock() if wall < 0 else wall
        now = (w0 - self.t0) * self.speedup  # model_now's, inline: a call costs ~330 instructions a step
        if eng.now < now - MAX_LAG_S * self.speedup:
            self._fell_behind((now - eng.now) / self.speedup)
            eng.now = now
        start = eng.now
        out, d = eng.schedule_step()
        loop = self._loop
        assert loop is not None
        if not out.scheduled:
            eng.finish_step(out, start, 0.0)
            for flush in self.on_flush:
                flush()
            # nothing can run (every request waits for remote KV): park until a request comes or a transfer ends
            wakeup = eng.scheduler.next_wakeup()
            self._parked = True
            if wakeup is not None:
                self._idle_wakeup = wakeup
                self._handle = loop.call_later(max(self.t0 + wakeup / self.speedup - self.clock(), 0.0),
                                               self._wake_up)
            return
        deadline = self.t0 + (start + d) / self.speedup
        w1 = self.clock()
        self._in_flight_end = start + d
        self._step = (out, start, d, deadline, w1 - w0)
        self._handle = loop.call_later(deadline - w1 if deadline > w1 else 0.0, self._end)

    def _end(self) -> None:
        """The in-flight step's time is up: its tokens go out, finished requests close, the next step starts."""
        step = self._step
        assert step is not None
        self._handle = None
        self._in_flight_end = -1.0
        out, start, d, deadline, busy = step
        w2 = self.clock()
        finished = self.engine.finish_step(out, start, d)
        self._emit(out.sampling, start + d)
        for req in finished:
            self._close(req)
        for flush in self.on_flush:
            flush()
        sizes = self.hists.step_tokens  # folded into the iteration_tokens histogram when metrics are read
        n = out.num_tokens
        sizes[n] = sizes.get(n, 0) + 1
        w3 = self.clock()
        lag = self.lag
        late = w3 - deadline  # ClockLag.record (figures.py), inline: a call costs ~330 instructions a step
        lag.last_s = late
        if late > lag.max_s:
            lag.max_s = late
        lag.busy_s += busy + (w3 - w2)
        lag.steps += 1
        self._step = None  # only now: an abort raised while emitting must not kick a second chain
        self._begin(w3)

    def _fell_behind(self, lag_s: float) -> None:
        lag = self.lag
        lag.resyncs += 1
        lag.record(lag_s)
        wall = self.clock()
        if wall - lag._warned_at >= WARN_EVERY_S:
            lag._warned_at = wall
            log.warning(
                "engine loop fell %.1f ms behind the emulated clock with %d streams (%d times so far): "
                "this process cannot keep up, and clients see slower tokens than the model",
                1e3 * lag_s, len(self.streams), lag.resyncs,
            )

    def _emit(self, sampled: list[Request], t: float) -> None:
        streams, hists = self.streams, self.hists
        prev, steady = self._prev_end, 0
        gone: list[Request] | None = None  # allocated only when a client went away
        running, finished = RequestStatus.RUNNING, RequestStatus.FINISHED
        get = streams.get
        for req in sampled:
            st = get(req.req_id)
            status = req.status
            if st is None or (status is not running and status is not finished):
                continue
            if not st.sink.token(req.all_token_ids[-1]):  # type: ignore[index]  # the server's requests carry ids
                if gone is None:
                    gone = []
                gone.append(req)
            last = st.last_token_time
            if last < 0:
                hists.ttft.observe(t - req.arrival_time)
                hists.queue.observe(req.queue_time)
                hists.prefill.observe(t - req.first_scheduled_time)
                if req.num_cached_tokens > 0:
                    hists.cached_prompt_tokens += req.num_cached_tokens
            elif last == prev:
                steady += 1  # decoded in the previous step too: same gap for all of these
            else:
                hists.itl.observe(t - last)
            st.last_token_time = t
        if steady:
            hists.itl.observe(t - prev, steady)
        self._prev_end = t
        if gone is not None:
            for req in gone:
                self.abort(req)

    def _close(self, req: Request) -> None:
        st = self.streams.pop(req.req_id, None)
        if st is None:
            return
        st.done = True
        reason = req.finish_reason or FinishReason.LENGTH
        if reason is not FinishReason.ABORT:
            self.hists.finished(req, st.last_token_time)
        st.sink.finish(req, reason.value, req.stop_reason)
        if self.on_close is not None:
            end = req.finish_time
            try:  # an observer's failure must not skip the rest of the step (and with it every later step)
                self.on_close(req, reason.value, end if end >= 0 else self.model_now())
            except Exception:
                log.exception("on_close hook failed for request %r", req.req_id)

    def _apply_aborts(self) -> None:
        aborts, self._aborts = self._aborts, []
        now = max(self.engine.now, self.model_now())
        for req in aborts:
            self.engine.scheduler.abort(req, now)
            self._close(req)
        for flush in self.on_flush:
            flush()
