"""An engine: scheduler + step-time model, driven by an injected clock (real or virtual time).

``step()`` runs one step at ``self.now`` and reports its duration; a real-time driver sleeps for it, a
virtual-time driver just adds it. ``run_until(t)`` executes every step that *starts* before ``t`` and
fast-forwards runs of pure-decode steps in which nothing can change but counters: no request finishes,
nothing can be admitted, and the free blocks cover every block boundary crossed. Such a run is replayed
exactly (same step times, same block allocation order, same hashes) without building per-step objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.core.engine.config import SchedulerConfig
from shared.core.engine.pd import KVLink
from shared.core.engine.request import Request
from shared.core.engine.scheduler import Scheduler, StepOutput
from shared.core.engine.stats import LogHistogram
from shared.core.engine.step_time import SplitStepTime, StepTimeModel
from shared.core.kv_events import KVEventBatch


@dataclass(slots=True)
class StepResult:
    """One executed step: when it started, how long it took, what it did and who finished."""

    start: float
    duration: float
    output: StepOutput
    finished: list[Request]


@dataclass(slots=True)
class EngineStats:
    """Time-based figures of one engine (virtual seconds)."""

    busy_s: float = 0.0
    kv_usage_integral: float = 0.0  # ∫ usage dt over busy time
    kv_usage_max: float = 0.0
    fast_steps: int = 0
    itl: LogHistogram = field(default_factory=LogHistogram)  # per decode token: the step gap it waited


class Engine:
    """One emulated model server's engine."""

    def __init__(
        self,
        config: SchedulerConfig,
        step_model: StepTimeModel,
        *,
        fast_forward: bool = True,
        lora_load_s: float = 0.0,
        kv_link: KVLink | None = None,
        kv_bytes_per_token: int | None = None,
    ) -> None:
        if lora_load_s < 0:
            raise ValueError("lora_load_s must be >= 0")
        self.scheduler = Scheduler(config)
        self.kv_link = kv_link
        if kv_bytes_per_token is None:  # the step model knows the model's KV size when it is a roofline
            per_tok = getattr(step_model, "kv_bytes_per_token", None)
            kv_bytes_per_token = int(per_tok()) if callable(per_tok) else 0
        if kv_bytes_per_token < 0:
            raise ValueError("kv_bytes_per_token must be >= 0")
        self.scheduler.kv_bytes_per_token = kv_bytes_per_token
        if kv_link is not None:
            link, per = kv_link, kv_bytes_per_token
            self.scheduler.kv_transfer_time = lambda n: link.transfer_s(n * per)
        self.step_model = step_model
        self._split = step_model.split if isinstance(step_model, SplitStepTime) else None
        self.lora_load_s = lora_load_s  # a step that first uses an unloaded adapter waits this long per adapter
        self.fast_forward = fast_forward
        self.now = 0.0  # when the engine can start its next step
        self.stats = EngineStats()
        self.last_step_end = 0.0
        self.last_step_finished = 0
        self._steady = False  # the last step was pure decode of every running request

    # -- intake ---------------------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Enqueue a request that arrived at ``req.arrival_time``."""
        if not self.scheduler.has_work() and self.now < req.arrival_time:
            self.now = req.arrival_time
        self.scheduler.add_request(req)

    def has_work(self) -> bool:
        """True while requests are waiting or running."""
        return self.scheduler.has_work()

    @property
    def num_outstanding(self) -> int:
        """Requests waiting or running."""
        s = self.scheduler
        return len(s.running) + s.num_waiting

    def take_kv_events(self, data_parallel_rank: int | None = None) -> KVEventBatch | None:
        """KV-cache events since the last call, stamped with the end of the last step; None if there are none.

        Call it after each step (real-time drivers) or after ``run_until`` (a fast-forwarded run of decode
        steps reports its events in one batch).
        """
        events = self.scheduler.take_kv_events()
        if not events:
            return None
        return KVEventBatch(ts=self.last_step_end, events=events, data_parallel_rank=data_parallel_rank)

    # -- stepping -------------------------------------------------------------------------------------
    def schedule_step(self) -> tuple[StepOutput, float]:
        """First half of a step (real-time drivers): decide the batch and return it with its duration."""
        out = self.scheduler.schedule(self.now)
        if not out.scheduled:
            # nothing to run (e.g. every request waits for remote KV): no forward pass, no time. A real-time
            # driver then waits for a new request or until ``scheduler.next_wakeup()``.
            return out, 0.0
        d = self.step_model.step_time(
            out.num_tokens, len(out.scheduled), len(out.sampling), out.attn_work, out.kv_read
        )
        if out.lora_loads:
            d += self.lora_load_s * len(out.lora_loads)
        return out, d

    def finish_step(self, out: StepOutput, start: float, duration: float) -> list[Request]:
        """Second half of a step: tokens are out at ``start + duration``."""
        s = self.scheduler
        end = start + duration
        usage = s.kv.usage
        st = self.stats
        st.busy_s += duration
        st.kv_usage_integral += usage * duration
        if usage > st.kv_usage_max:
            st.kv_usage_max = usage
        sampling = out.sampling
        # requests past their first token: a plain loop (attrgetter on a slots object goes through the generic
        # attribute lookup, which costs more instructions than these few bytecodes; measured with callgrind)
        decode = 0
        for r in sampling:
            if r.num_output_tokens:
                decode += 1
        if decode:
            st.itl.observe(duration, decode)
        finished = s.update_from_output(out, end)
        self._steady = (
            not out.preempted and len(out.sampling) == len(out.scheduled) and out.num_tokens == len(out.scheduled)
        )
        self.now = end
        self.last_step_end = end
        self.last_step_finished = len(finished)
        return finished

    def step(self) -> StepResult:
        """Run one whole step at ``self.now``."""
        start = self.now
        out, d = self.schedule_step()
        finished = self.finish_step(out, start, d)
        return StepResult(start, d, out, finished)

    def run_until(self, t_limit: float, sink: list[Request] | None = None) -> None:
        """Execute every step that starts before ``t_limit``; finished requests go to ``sink``."""
        s = self.scheduler
        while self.now < t_limit and s.has_work():
            if self.fast_forward and self._steady and self._fast_forward(t_limit):
                continue
            start = self.now
            out, d = self.schedule_step()
            fin = self.finish_step(out, start, d)
            if sink is not None and fin:
                sink.extend(fin)
            if not out.scheduled and not out.preempted:
                t = s.next_wakeup()
                if t is None:
                    break  # stuck (no request fits even an empty pool); never spin
                if t > self.now:  # idle until a KV transfer completes (P/D)
                    self.now = t

    def _fast_forward(self, t_limit: float) -> bool:
        s = self.scheduler
        running = s.running
        n = len(running)
        cfg = s.config
        if n == 0 or n > cfg.max_num_batched_tokens:
            return False
        if (len(s.waiting) and n < cfg.max_num_seqs) or s.remote_wait or s.kv_ready:
            return False
        sum_c = 0
        left_min = 1 << 62
        for r in running:
            c = r.num_computed_tokens
            if c != r.num_tokens - 1:
                return False
            sum_c += c
            left = r.finish_at - r.num_output_tokens
            if left < left_min:
                left_min = left
        k = left_min - 1  # the step that finishes someone runs the normal way
        if k < 2:
            return False
        kv = s.kv
        if self._blocks_needed(k) > kv.num_free:
            lo, hi = 0, k  # largest k whose block boundaries the free pool covers
            while lo < hi:
                mid = (lo + hi + 1) >> 1
                if self._blocks_needed(mid) <= kv.num_free:
                    lo = mid
                else:
                    hi = mid - 1
            k = lo
            if k < 2:
                return False
        # step times: every step is n decode tokens on a context that grows by n per step
        model = self.step_model.step_time
        # the same floats as step_time, with the part that does not grow with the context computed once
        split = self._split
        fixed, per_attn, per_kv = split(n, n, n) if split is not None else (0.0, 0.0, 0.0)
        st = self.stats
        hist = st.itl
        usage0 = kv.usage
        t = self.now
        acc = sum_c + n
        steps = 0
        # neighbouring decode steps nearly always land in the same histogram bin: count runs, not steps
        counts = hist.counts
        b_idx, b_lo, b_hi = 0, 1.0, 0.0
        d_sum = 0.0
        while steps < k and t < t_limit:
            d = fixed + per_attn * acc + per_kv * acc if split is not None else model(n, n, n, acc, acc)
            if not b_lo <= d < b_hi:
                b_idx, b_lo, b_hi = hist.locate(d)
            counts[b_idx] += n
            d_sum += d
            t += d
            acc += n
            steps += 1
        hist.sum += d_sum * n
        hist.total += steps * n
        self._apply_decode_run(steps)
        usage1 = kv.usage
        span = t - self.now
        st.busy_s += span
        st.kv_usage_integral += 0.5 * (usage0 + usage1) * span
        if usage1 > st.kv_usage_max:
            st.kv_usage_max = usage1
        st.fast_steps += steps
        counters = s.counters
        counters.steps += steps
        counters.scheduled_tokens += n * steps
        counters.generation_tokens += n * steps
        self.now = t
        self.last_step_end = t
        self.last_step_finished = 0
        return True

    def _blocks_needed(self, k: int) -> int:
        bs = self.scheduler.config.block_size
        total = 0
        for r in self.scheduler.running:
            total += -(-(r.num_computed_tokens + k) // bs) - len(r.block_ids)
        return total

    def _apply_decode_run(self, steps: int) -> None:
        """State after ``steps`` decode steps, with block allocations and hashing in step order."""
        s = self.scheduler
        kv = s.kv
        bs = s.config.block_size
        running = s.running
        caching = kv.enable_caching
        events: list[tuple[int, int, int]] = []
        for idx, r in enumerate(running):
            c = r.num_computed_tokens
            j = (-c) % bs  # step j computes position c+j: a new block when it starts one
            while j < steps:
                events.append((j, idx, 0))
                j += bs
            if caching:
                j = (-(c + 1)) % bs  # block full once position c+j is computed
                while j < steps:
                    events.append((j, idx, 1))
                    j += bs
            toks = r.all_token_ids
            if toks is not None:
                k0 = r.num_output_tokens
                toks.extend(r.token_at(k0 + m) for m in range(steps))
        events.sort()
        for j, idx, kind in events:
            r = running[idx]
            if kind == 0:
                kv.allocate(r, 1)
            else:
                kv.cache_full_blocks(r, r.num_computed_tokens + j + 1)
        for r in running:
            r.num_computed_tokens += steps
            r.num_tokens += steps
            r.num_output_tokens += steps
