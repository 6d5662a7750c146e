"""An emulated engine fed by the global request broker (seed 003) instead of by HTTP, in real time.

The node pulls only when its engine's waiting queue is empty, with the engine's free KV blocks, token budget
and free sequence slots as the budget, so the broker holds the backlog and idle nodes can steal it. Each
request's answer goes back to its origin node through the broker as two chunks: the first token (``seq`` 0)
and the rest with the finish (``seq`` 1), which keeps Redis writes per request constant. The loop also keeps
the node's heartbeat and recovers dead peers every ``scheduler_sync_period``. Model time runs ``speedup``
times faster than wall time, as in :class:`~services.engine_server.runner.EngineRunner`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from shared.core.engine import Engine, Request
from shared.core.queueing import Output, PullBudget
from shared.state.queue import GlobalBroker

IDLE_POLL_S = 0.002
QUEUE_WAITS_KEPT = 1_000_000


class BrokerNode:
    """One engine node in global mode: pull, step, deliver."""

    def __init__(self, broker: GlobalBroker, engine: Engine, *, speedup: float = 1.0,
                 reserved_output_blocks: int = 2, clock: Callable[[], float] = time.monotonic) -> None:
        if speedup <= 0:
            raise ValueError("speedup must be > 0")
        self.broker = broker
        self.engine = engine
        self.speedup = speedup
        self.reserved = reserved_output_blocks
        self.clock = clock
        self.t0 = clock()
        self.served = 0
        # wall seconds from put to pull, per request pulled: the most recent (a long-running node kept them all)
        self.queue_waits: deque[float] = deque(maxlen=QUEUE_WAITS_KEPT)

    def model_now(self) -> float:
        """Model time (seconds since start, times ``speedup``)."""
        return (self.clock() - self.t0) * self.speedup

    def budget(self) -> PullBudget:
        """What the engine can take now."""
        s = self.engine.scheduler
        cfg = s.config
        return PullBudget(available_blocks=s.kv.num_free, block_size=cfg.block_size,
                          reserved_output_blocks=self.reserved, max_num_batched_tokens=cfg.max_num_batched_tokens,
                          batch=cfg.max_num_seqs - len(s.running) - len(s.waiting),
                          total_blocks=cfg.num_gpu_blocks - 1)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set (or the task is cancelled: a kill)."""
        b, eng = self.broker, self.engine
        await b.start()
        last_sync = -1e18
        while not stop.is_set():
            wall = time.time()
            if wall - last_sync >= b.params.sync_period_s:
                await b.heartbeat(wall)
                await b.recover_dead(wall)
                last_sync = wall
            if not len(eng.scheduler.waiting):
                await self._pull(wall)
            if not eng.has_work():
                await asyncio.sleep(IDLE_POLL_S)
                continue
            now = self.model_now()
            if eng.now < now:
                eng.now = now
            start = eng.now
            out, d = eng.schedule_step()
            await asyncio.sleep(max(self.t0 + (start + d) / self.speedup - self.clock(), 0.0))
            finished = eng.finish_step(out, start, d)
            chunks = [Output(request_id=r.req_id, seq=0, num_tokens=1, finished=r.num_output_tokens >= r.finish_at)
                      for r in out.sampling if r.num_output_tokens == 1]
            chunks += [Output(request_id=r.req_id, seq=1, num_tokens=r.num_output_tokens - 1, finished=True)
                       for r in finished if r.num_output_tokens > 1]
            self.served += len(finished)
            if chunks:
                await b.put_results(chunks)

    async def _pull(self, wall: float) -> None:
        budget = self.budget()
        if budget.empty:
            return
        for q in await self.broker.get_requests(budget, wall):
            self.queue_waits.append(wall - q.arrival_s)
            req = Request(q.request_id, prompt_len=max(q.prompt_len, 1), max_tokens=q.max_tokens, ignore_eos=True,
                          arrival_time=self.model_now())
            try:
                self.engine.add_request(req)
            except ValueError as err:  # the engine cannot serve it (too long): answered, never dropped
                await self.broker.put_results([Output(request_id=q.request_id, seq=0, finished=True, error_code=400,
                                                      error=str(err))])
