"""The figures the step loop keeps for the metrics: per-request histograms and the emulated-clock lag."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.core.engine import Request
from shared.core.engine.stats import Histogram

_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
_ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass(slots=True)
class RequestHistograms:
    """Per-request and per-step histograms (seconds of model time; token counts)."""

    ttft: Histogram = field(default_factory=Histogram)
    itl: Histogram = field(default_factory=Histogram)
    e2e: Histogram = field(default_factory=Histogram)
    queue: Histogram = field(default_factory=Histogram)
    prefill: Histogram = field(default_factory=Histogram)
    decode: Histogram = field(default_factory=Histogram)
    inference: Histogram = field(default_factory=Histogram)
    tpot: Histogram = field(default_factory=Histogram)
    prompt_len: Histogram = field(default_factory=lambda: Histogram(_TOKEN_BUCKETS))
    output_len: Histogram = field(default_factory=lambda: Histogram(_TOKEN_BUCKETS))
    iteration_tokens: Histogram = field(default_factory=lambda: Histogram(_ITERATION_BUCKETS))
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache at first scheduling
    # steps by their token count, not yet in ``iteration_tokens``: the step loop counts here (a dict update, no
    # bucket search) and :meth:`fold_steps` moves them into the histogram when the metrics are read
    step_tokens: dict[int, int] = field(default_factory=dict)

    def fold_steps(self) -> Histogram:
        """``iteration_tokens`` with every step counted so far (what the metrics read)."""
        pending, self.step_tokens = self.step_tokens, {}
        hist = self.iteration_tokens
        for n, count in pending.items():
            hist.observe(n, count)
        return hist

    def finished(self, req: Request, last_token_time: float) -> None:
        """Per-request figures of a request that ended normally (vLLM's definitions)."""
        self.e2e.observe(req.e2e)
        self.prompt_len.observe(req.prompt_len)
        self.output_len.observe(req.num_output_tokens)
        if req.first_scheduled_time >= 0 and req.first_token_time >= 0:
            self.inference.observe(last_token_time - req.first_scheduled_time)
            self.decode.observe(last_token_time - req.first_token_time)
            if req.num_output_tokens > 1:
                self.tpot.observe((last_token_time - req.first_token_time) / (req.num_output_tokens - 1))


@dataclass(slots=True)
class ClockLag:
    """How far token emission trails the emulated clock (wall seconds)."""

    last_s: float = 0.0
    max_s: float = 0.0
    resyncs: int = 0  # steps that fell more than MAX_LAG_S behind and restarted the chain
    busy_s: float = 0.0  # wall seconds the step loop spent working (not sleeping): its duty cycle
    steps: int = 0
    _warned_at: float = -1e9

    def record(self, lag: float) -> None:
        """Note one step's lag."""
        # EngineRunner._end (runner.py) has these lines inline for every step: change both
        self.last_s = lag
        if lag > self.max_s:
            self.max_s = lag
