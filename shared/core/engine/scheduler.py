"""One ``schedule()`` step and the output update, following vLLM v1's scheduler (spec §2).

There is no prefill/decode split: every step tries to bring each scheduled request's
``num_computed_tokens`` up to ``num_tokens``, which covers chunked prefill, prefix hits and decode alike.
The running pass goes first (with recompute preemption when the pool runs dry); the waiting pass admits
new work only if nothing was preempted. As in vLLM v0.33, ``long_prefill_token_threshold`` does not cap
a request that is the only one running or waiting, and a request that is its own preemption victim
(priority policy) does not end the running pass: the requests after it are still scheduled.

This is the hot loop of every simulation: it touches each running request once with plain integer
arithmetic and allocates only on block boundaries.
"""

from __future__ import annotations

from collections.abc import Callable

from shared.core.engine.config import SchedulerConfig
from shared.core.engine.kv_cache import KVCache
from shared.core.engine.pd import KVHandoff
from shared.core.engine.queues import make_queue
from shared.core.engine.request import FinishReason, Request, RequestStatus
from shared.core.engine.stats import LoraStats, SchedulerCounters
from shared.core.engine.stop import find_stop
from shared.core.kv_events import KVEvent
from shared.core.roles import NodeRole

RUNNING = RequestStatus.RUNNING


def _no_transfer_time(num_tokens: int) -> float:
    return 0.0


class StepOutput:
    """What one ``schedule()`` decided, plus the aggregates the step-time model needs.

    ``attn_work`` is Σ (q·c + q(q+1)/2) and ``kv_read`` is Σ (c + q) over scheduled chunks of q new
    tokens on c already-computed ones.
    """

    __slots__ = (
        "attn_work",
        "kv_read",
        "lora_loads",
        "num_scheduled",
        "num_tokens",
        "preempted",
        "sampling",
        "scheduled",
    )

    def __init__(self) -> None:
        self.scheduled: list[Request] = []
        self.num_scheduled: list[int] = []
        self.preempted: list[Request] = []
        self.sampling: list[Request] = []  # requests whose computed tokens reach num_tokens: they sample
        self.num_tokens = 0
        self.attn_work = 0
        self.kv_read = 0
        self.lora_loads: list[str] = []  # adapters this step had to load before it could run

    def pairs(self) -> list[tuple[str, int]]:
        """``(request id, tokens)`` in scheduling order."""
        return [(r.req_id, n) for r, n in zip(self.scheduled, self.num_scheduled, strict=True)]


class Scheduler:
    """Continuous-batching scheduler over a :class:`KVCache`; deterministic, no clock of its own."""

    def __init__(self, config: SchedulerConfig) -> None:
        problems = config.problems()
        if problems:
            raise ValueError("; ".join(problems))
        self.config = config
        self.kv = KVCache(
            config.num_gpu_blocks, config.block_size, config.enable_prefix_caching, config.enable_kv_events
        )
        self.waiting = make_queue(config.policy)
        self.running: list[Request] = []
        self.counters = SchedulerCounters()
        self._priority = config.policy == "priority"
        self._max_model_len = config.model_len_limit
        self._next_uid = 0
        self.lora_running: dict[str, int] = {}  # adapter -> running requests using it
        self.lora_loaded: dict[str, None] = {}  # adapters loaded, least recently admitted first
        self._prefill_only = config.role is NodeRole.PREFILL
        self.remote_wait: list[Request] = []  # P/D decode side: holding blocks, KV still on the way
        self.kv_ready: list[Request] = []  # P/D decode side: KV arrived, waiting for a running slot (first)
        self.sending: list[tuple[float, Request]] = []  # P/D prefill side: (release time, finished request)
        self.kv_bytes_per_token = 0
        self.kv_transfer_time: Callable[[int], float] = _no_transfer_time  # seconds to move n tokens' KV
        # the leading one-token decodes of a step in one tight loop (see ``schedule``); off, every request goes
        # through the general loop: the differential test runs both and compares them step by step
        self.fused_decode = True

    # -- intake ---------------------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Validate and enqueue a new request; raises ValueError for one the engine cannot serve."""
        if req.prompt_len < 1:
            raise ValueError(f"request {req.req_id}: empty prompt")
        if req.max_tokens < 1:
            raise ValueError(f"request {req.req_id}: max_tokens must be >= 1")
        if req.prompt_len >= self._max_model_len:
            raise ValueError(
                f"request {req.req_id}: prompt of {req.prompt_len} tokens does not fit max_model_len "
                f"{self._max_model_len}"
            )
        blocks = -(-(req.prompt_len + 1) // self.config.block_size)
        if blocks > self.config.num_gpu_blocks - 1:
            raise ValueError(
                f"request {req.req_id}: needs {blocks} KV blocks, the pool has {self.config.num_gpu_blocks - 1}"
            )
        if req.lora is not None and not self.config.max_loras:
            raise ValueError(f"request {req.req_id}: LoRA adapter {req.lora!r} but LoRA is off (max_loras=0)")
        if req.kv_pending and self._prefill_only:
            raise ValueError(f"request {req.req_id}: remote prefill sent to a prefill-only engine")
        if req.uid < 0:
            req.uid = self._next_uid
        self._next_uid = max(self._next_uid, req.uid) + 1
        finish_at, reason, stop = find_stop(req, self._max_model_len)
        if self._prefill_only and finish_at > 1:  # the prefill request ends with its first token
            finish_at, reason, stop = 1, FinishReason.LENGTH, None
        req.finish_at = finish_at
        req.planned_finish = (reason, stop)
        req.status = RequestStatus.WAITING
        self.waiting.add(req)

    def has_work(self) -> bool:
        """True while any request is waiting, running or waiting for remote KV."""
        return bool(self.running) or len(self.waiting) > 0 or bool(self.remote_wait) or bool(self.kv_ready)

    def next_wakeup(self) -> float | None:
        """Earliest time a KV transfer completes (a parked request becomes runnable or held blocks free up)."""
        times = [r.kv_ready_at for r in self.remote_wait] + [t for t, _ in self.sending]
        return min(times) if times else None

    def _advance_transfers(self, now: float) -> None:
        """Free blocks whose KV was sent; move requests whose KV arrived to ``kv_ready``, in order.

        Ready requests hold all their blocks, so they are admitted before the waiting queue: behind a
        request that cannot get blocks they would hold blocks forever (a deadlock on a small pool).
        """
        if self.sending:
            keep: list[tuple[float, Request]] = []
            for t, r in self.sending:
                if t <= now:
                    self.kv.free(r)
                else:
                    keep.append((t, r))
            self.sending = keep
        if self.remote_wait:
            arrived = [r for r in self.remote_wait if r.kv_ready_at <= now]
            if not arrived:
                return
            self.remote_wait = [r for r in self.remote_wait if r.kv_ready_at > now]
            kv = self.kv
            for r in arrived:
                r.kv_pending = False
                r.num_computed_tokens = r.num_tokens - 1  # the last prompt token is recomputed for its logits
                if kv.enable_caching:
                    kv.cache_full_blocks(r, r.num_computed_tokens)
                r.status = RequestStatus.WAITING
            self.kv_ready.extend(arrived)

    # -- the step -------------------------------------------------------------------------------------
    def schedule(self, now: float = 0.0) -> StepOutput:
        """Decide one step: which requests compute how many tokens (spec §2.1-2.2)."""
        cfg = self.config
        kv = self.kv
        bs = cfg.block_size
        thr = cfg.long_prefill_token_threshold
        mml = self._max_model_len
        budget = cfg.max_num_batched_tokens
        running = self.running
        if self.remote_wait or self.sending:
            self._advance_transfers(now)
        out = StepOutput()
        sched, nums, sampling, preempted = out.scheduled, out.num_scheduled, out.sampling, out.preempted
        attn = 0
        kvread = 0

        # running pass
        caching = kv.enable_caching
        last_pos = mml - 1  # a request never computes past max_model_len - 1 tokens
        nrun = len(running)
        i = 0
        if self.fused_decode:
            # The leading run of one-token decodes, in one tight loop: exactly what the general loop below does
            # for n = 1 when the blocks it needs are free (no preemption), with the three per-request list
            # appends replaced by slices of ``running`` afterwards. The first request that is not such a
            # decode (a prefill chunk, max_model_len, a block the pool cannot give) hands over to the general
            # loop at its index. A steady decode step is only this loop.
            # (every running request takes at least a token, so running never outgrows the budget in practice;
            # the slice keeps the general loop's "budget > 0" bound all the same)
            for req in running if nrun <= budget else running[:budget]:
                nt = req.num_tokens
                if nt - req.num_computed_tokens != 1 or nt > last_pos:
                    break
                if nt > req.num_slots:  # its next token starts a block
                    need = -(-nt // bs) - len(req.block_ids)
                    if need > kv.num_free:
                        break  # the general loop preempts
                    kv.allocate(req, need)
                if caching and nt >= req.next_full:
                    kv.cache_full_blocks(req, nt)
                req.num_computed_tokens = nt
                kvread += nt
                i += 1
            if i:
                out.scheduled = sched = running[:i]
                out.num_scheduled = nums = [1] * i
                out.sampling = sampling = running[:i]
                budget -= i
        sched_append, nums_append, sampling_append = sched.append, nums.append, sampling.append
        while i < nrun and budget > 0:
            req = running[i]
            c = req.num_computed_tokens
            nt = req.num_tokens
            n = nt - c
            if n == 1 and nt <= last_pos and nt <= req.num_slots and (nt < req.next_full or not caching):
                # a plain decode (one token, room in its blocks, no block filling up): what the general path
                # below does for n = 1 (budget >= 1 here), in half the bytecodes; most steps are only these
                sched_append(req)
                nums_append(1)
                budget -= 1
                kvread += nt
                req.num_computed_tokens = nt
                sampling_append(req)
                i += 1
                continue
            if 0 < thr < n and (nrun > 1 or len(self.waiting) > 0):  # a lone request is never capped
                n = thr
            if n > budget:
                n = budget
            total = c + n
            if total > last_pos:
                total = last_pos
                n = total - c
            if n <= 0:
                i += 1
                continue
            if total > req.num_slots:
                need = -(-total // bs) - len(req.block_ids)
                self_preempted = False
                while need > kv.num_free:
                    vi = self._victim_index()
                    victim = running.pop(vi)
                    nrun -= 1
                    if victim is req:
                        self_preempted = True
                    elif vi < i:  # priority victim already scheduled this step: give its tokens back
                        i -= 1
                        j = next(k for k, r in enumerate(sched) if r is victim)
                        nv = nums[j]
                        del sched[j], nums[j]
                        budget += nv
                        cv = victim.num_computed_tokens
                        kvread -= cv
                        if nv != 1:
                            attn -= nv * (cv - nv) + nv * (nv + 1) // 2 - cv
                        if victim in sampling:
                            sampling.remove(victim)
                    self._preempt(victim)
                    preempted.append(victim)
                    if self_preempted:
                        break
                if self_preempted:
                    # vLLM v0.33: go on with the requests after it (only priority can get here with any:
                    # FCFS preempts the last running request); running[i] is now the next one
                    continue
                kv.allocate(req, need)
            if caching and total >= req.next_full:
                kv.cache_full_blocks(req, total)
            sched_append(req)
            nums_append(n)
            budget -= n
            if n != 1:  # attention work of a chunk beyond what kv_read already counts (c + 1 for decode)
                attn += n * c + n * (n + 1) // 2 - total
            kvread += total
            req.num_computed_tokens = total
            if total == nt:
                sampling_append(req)
            i += 1
        attn += kvread

        # waiting pass (skipped outright when nothing waits: the common decode step)
        if not preempted and (len(self.waiting) or self.kv_ready):
            budget, attn, kvread = self._admit(out, budget, attn, kvread, now)

        out.num_tokens = cfg.max_num_batched_tokens - budget
        out.attn_work = attn
        out.kv_read = kvread
        c_ = self.counters
        c_.steps += 1
        c_.scheduled_tokens += out.num_tokens
        c_.preemptions += len(preempted)
        return out

    def _admit(self, out: StepOutput, budget: int, attn: int, kvread: int, now: float) -> tuple[int, int, int]:
        cfg = self.config
        kv = self.kv
        bs = cfg.block_size
        thr = cfg.long_prefill_token_threshold
        mml = self._max_model_len
        chunked = cfg.enable_chunked_prefill
        running = self.running
        waiting = self.waiting
        counters = self.counters
        max_loras = cfg.max_loras
        # as vLLM: the adapters of the requests this step runs (not of running requests it skipped)
        batch_loras = {r.lora for r in out.scheduled if r.lora is not None} if max_loras else set()
        if self.kv_ready:
            budget, attn, kvread = self._admit_ready(out, budget, attn, kvread, batch_loras)
        skipped: list[Request] = []
        while budget > 0 and len(running) < cfg.max_num_seqs and len(waiting) > 0:
            req = waiting.peek()
            lora = req.lora
            if lora is not None and lora not in batch_loras and len(batch_loras) >= max_loras:
                skipped.append(waiting.pop())  # its adapter would exceed max_loras: later requests may go
                continue
            if req.kv_pending:  # P/D decode side: take blocks for the prompt and wait for its KV
                if not self._park_for_remote_kv(req, now):
                    break
                continue
            hits = kv.lookup(req)
            hit_tokens = len(hits) * bs
            n = req.num_tokens - hit_tokens
            if 0 < thr < n and len(running) + len(waiting) > 1:  # a lone request is never capped
                n = thr
            if n > mml - 1 - hit_tokens:
                n = mml - 1 - hit_tokens
            if not chunked and n > budget:
                break
            if n > budget:
                n = budget
            evictable = kv.num_evictable(hits)
            # admission reserves room for the whole current sequence, not just this chunk
            if -(-req.num_tokens // bs) - len(hits) + evictable > kv.num_free:
                break
            total = hit_tokens + n
            waiting.pop()
            kv.take_hits(req, hits)
            kv.allocate(req, -(-total // bs) - len(hits))
            if kv.enable_caching and total // bs > req.num_cached_blocks:
                kv.cache_full_blocks(req, total)
            req.status = RUNNING
            running.append(req)
            if lora is not None:
                self._lora_admit(lora, out)
                batch_loras.add(lora)
            if req.first_scheduled_time < 0:
                req.first_scheduled_time = now
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = hit_tokens
            if kv.enable_caching:
                counters.prefix_queries += req.num_tokens
                counters.prefix_hits += hit_tokens
            out.scheduled.append(req)
            out.num_scheduled.append(n)
            budget -= n
            attn += n * hit_tokens + n * (n + 1) // 2
            kvread += total
            req.num_computed_tokens = total
            if total == req.num_tokens:
                out.sampling.append(req)
        for req in reversed(skipped):  # back in front, in their order
            waiting.prepend(req)
        return budget, attn, kvread

    def _admit_ready(
        self, out: StepOutput, budget: int, attn: int, kvread: int, batch_loras: set[str]
    ) -> tuple[int, int, int]:
        """Run requests whose remote KV arrived: only their last prompt token is left to compute."""
        running = self.running
        max_seqs, max_loras = self.config.max_num_seqs, self.config.max_loras
        keep: list[Request] = []
        for req in self.kv_ready:
            lora = req.lora
            blocked = lora is not None and lora not in batch_loras and len(batch_loras) >= max_loras
            if budget <= 0 or len(running) >= max_seqs or blocked:
                keep.append(req)
                continue
            c = req.num_computed_tokens
            n = req.num_tokens - c
            if n > budget:
                n = budget
            req.status = RUNNING
            running.append(req)
            if lora is not None:
                self._lora_admit(lora, out)
                batch_loras.add(lora)
            out.scheduled.append(req)
            out.num_scheduled.append(n)
            budget -= n
            attn += n * c + n * (n + 1) // 2
            kvread += c + n
            req.num_computed_tokens = c + n
            if c + n == req.num_tokens:
                out.sampling.append(req)
        self.kv_ready = keep
        return budget, attn, kvread

    def _park_for_remote_kv(self, req: Request, now: float) -> bool:
        kv = self.kv
        bs = self.config.block_size
        hits = kv.lookup(req)
        blocks = -(-req.num_tokens // bs)
        if blocks - len(hits) + kv.num_evictable(hits) > kv.num_free:
            return False
        self.waiting.pop()
        kv.take_hits(req, hits)
        kv.allocate(req, blocks - len(hits))
        local = len(hits) * bs
        remote = req.num_tokens - local  # local prefix hits are not transferred
        req.num_cached_tokens = local
        req.num_computed_tokens = local
        req.kv_ready_at = now + self.kv_transfer_time(remote)
        req.status = RequestStatus.WAITING_FOR_REMOTE_KVS
        if req.first_scheduled_time < 0:
            req.first_scheduled_time = now
        self.remote_wait.append(req)
        c = self.counters
        c.kv_transfers_in += 1
        c.kv_bytes_in += remote * self.kv_bytes_per_token
        return True

    def _lora_admit(self, lora: str, out: StepOutput) -> None:
        running = self.lora_running
        running[lora] = running.get(lora, 0) + 1
        loaded = self.lora_loaded
        if lora in loaded:
            del loaded[lora]  # re-inserted below as the most recently used
        else:
            out.lora_loads.append(lora)
            if len(loaded) >= self.config.lora_cache_size:
                # unload the least recently admitted adapter no running request uses
                idle = next((a for a in loaded if a not in running), None)
                if idle is not None:
                    del loaded[idle]
        loaded[lora] = None

    def _lora_release(self, req: Request) -> None:
        """``req`` (with an adapter) leaves the running set."""
        lora = req.lora
        assert lora is not None
        running = self.lora_running
        left = running[lora] - 1
        if left:
            running[lora] = left
        else:
            del running[lora]

    def _victim_index(self) -> int:
        running = self.running
        if not self._priority:
            return len(running) - 1
        # vLLM v0.33: max(running, key=(priority, arrival_time)); a tie keeps the earliest in running order
        best = 0
        key = (running[0].priority, running[0].arrival_time)
        for k in range(1, len(running)):
            r = running[k]
            rk = (r.priority, r.arrival_time)
            if rk > key:
                best, key = k, rk
        return best

    def _preempt(self, req: Request) -> None:
        if req.lora is not None:
            self._lora_release(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        self.waiting.prepend(req)

    # -- results --------------------------------------------------------------------------------------
    def update_from_output(self, out: StepOutput, now: float) -> list[Request]:
        """Sample one token for each request that computed all its tokens; return those that finished."""
        finished: list[Request] = []
        skipped = 0
        for req in out.sampling:
            if req.status is not RUNNING:  # preempted after this output was scheduled
                skipped += 1
                continue
            k = req.num_output_tokens
            toks = req.all_token_ids
            if toks is not None:
                try:  # the common case, without the None and length checks (a try costs nothing in 3.11)
                    toks.append(req.sampled_token_ids[k])  # type: ignore[index]
                except (IndexError, TypeError):  # past the sampled tokens, or none given
                    toks.append(req.filler_token)
            k += 1
            req.num_output_tokens = k
            req.num_tokens += 1
            if k == 1:
                req.first_token_time = now
                req.last_token_time = now
                self.counters.prompt_tokens += req.prompt_len
            if k >= req.finish_at:
                finished.append(req)
        self.counters.generation_tokens += len(out.sampling) - skipped
        if finished:
            for req in finished:
                if req.lora is not None:
                    self._lora_release(req)
                self._finish(req, now, req.planned_finish[0], req.planned_finish[1])
            self.running = [r for r in self.running if r.status is RUNNING]
        return finished

    def _finish(self, req: Request, now: float, reason: FinishReason, stop: int | None) -> None:
        if self._prefill_only and reason is not FinishReason.ABORT:
            self._hand_off(req, now)
        else:
            self.kv.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop
        req.finish_time = now
        if req.num_output_tokens:
            req.last_token_time = now  # the last token is sampled in the finishing step
        c = self.counters
        c.finished += 1
        c.finished_by_reason[reason.value] = c.finished_by_reason.get(reason.value, 0) + 1

    def _hand_off(self, req: Request, now: float) -> None:
        """Prefill side: keep the blocks until the decode side has pulled the prompt's KV."""
        n = req.prompt_len
        nbytes = n * self.kv_bytes_per_token
        req.kv_handoff = KVHandoff(req.req_id, n, nbytes, now, req.token_at(0))
        self.sending.append((now + self.kv_transfer_time(n), req))
        c = self.counters
        c.kv_transfers_out += 1
        c.kv_bytes_out += nbytes

    def abort(self, req: Request, now: float) -> None:
        """Drop a request wherever it is (client went away); frees its blocks."""
        if req.status is RUNNING:
            self.running.remove(req)
            if req.lora is not None:
                self._lora_release(req)
        elif req in self.kv_ready:
            self.kv_ready.remove(req)
        elif req.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(req)
        elif req.status is RequestStatus.WAITING_FOR_REMOTE_KVS:
            self.remote_wait.remove(req)
        else:
            return
        self._finish(req, now, FinishReason.ABORT, None)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (vLLM's ``reset_prefix_cache``): only when no request holds a block."""
        return self.kv.reset()

    def take_kv_events(self) -> list[KVEvent]:
        """KV-cache events since the last call, in the order they happened (empty when events are off)."""
        return self.kv.take_events()

    # -- views ----------------------------------------------------------------------------------------
    def lora_stats(self) -> LoraStats:
        """Adapters of running and of waiting requests (vLLM's ``lora_requests_info``)."""
        waiting = {r.lora for r in (*self.waiting, *self.remote_wait, *self.kv_ready) if r.lora is not None}
        return LoraStats(sorted(self.lora_running), sorted(waiting), self.config.max_loras, sorted(self.lora_loaded))

    @property
    def num_waiting(self) -> int:
        """Requests waiting: new, preempted, and parked for remote KV (vLLM counts those too)."""
        return len(self.waiting) + len(self.remote_wait) + len(self.kv_ready)

    @property
    def kv_usage(self) -> float:
        """KV-cache usage in [0, 1]."""
        return self.kv.usage
