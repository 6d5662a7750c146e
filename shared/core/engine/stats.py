"""Counters and histograms the engine keeps (the figures behind vLLM's metric names)."""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass, field

# vLLM's default latency buckets (seconds), used for the Prometheus histograms.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)


@dataclass(slots=True)
class SchedulerCounters:
    """Monotonic counters of one scheduler."""

    steps: int = 0
    scheduled_tokens: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    finished: int = 0
    finished_by_reason: dict[str, int] = field(default_factory=dict)
    kv_transfers_out: int = 0  # P/D prefill side: prompts handed off, and their KV bytes
    kv_bytes_out: int = 0
    kv_transfers_in: int = 0  # P/D decode side: prompts whose KV was pulled from a prefill engine
    kv_bytes_in: int = 0


@dataclass(frozen=True, slots=True)
class LoraStats:
    """LoRA adapters in use: the labels of vLLM's ``vllm:lora_requests_info`` gauge, plus what is loaded."""

    running: list[str]
    waiting: list[str]
    max_loras: int
    loaded: list[str]


class Histogram:
    """Cumulative-bucket histogram with weighted observations (Prometheus shape)."""

    __slots__ = ("bounds", "counts", "sum", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.total = 0

    def observe(self, value: float, count: int = 1) -> None:
        """Record ``count`` observations of ``value``."""
        # the first bucket whose bound is >= value (Prometheus' ``le``), found in C: the step loop observes
        # a few of these per step
        self.counts[bisect_left(self.bounds, value)] += count
        self.sum += value * count
        self.total += count


class LogHistogram:
    """Fine log-spaced histogram (about 1% wide bins) for percentiles of very many observations."""

    __slots__ = ("_inv_log", "_lo", "counts", "sum", "total")

    def __init__(self, lo: float = 1e-5, hi: float = 1e4, ratio: float = 1.01) -> None:
        self._lo = lo
        self._inv_log = 1.0 / math.log(ratio)
        self.counts = [0] * (int(math.log(hi / lo) * self._inv_log) + 2)
        self.sum = 0.0
        self.total = 0

    def observe(self, value: float, count: int = 1) -> None:
        """Record ``count`` observations of ``value``."""
        i = int(math.log(value / self._lo) * self._inv_log) + 1 if value > self._lo else 0
        if i >= len(self.counts):
            i = len(self.counts) - 1
        self.counts[i] += count
        self.sum += value * count
        self.total += count

    def locate(self, value: float) -> tuple[int, float, float]:
        """Bin index of ``value`` and the bin's [low, high) edges (for run-length observation)."""
        if value <= self._lo:
            return 0, 0.0, self._lo
        i = int(math.log(value / self._lo) * self._inv_log) + 1
        if i >= len(self.counts):
            return len(self.counts) - 1, self._edge(len(self.counts) - 1), math.inf
        return i, self._edge(i), self._edge(i + 1)

    def _edge(self, i: int) -> float:
        return self._lo * math.exp((i - 1) / self._inv_log)

    def merge(self, other: LogHistogram) -> None:
        """Add another histogram of the same shape."""
        for i, c in enumerate(other.counts):
            self.counts[i] += c
        self.sum += other.sum
        self.total += other.total

    def quantile(self, q: float) -> float:
        """Approximate q-quantile (bin's geometric middle); 0 when empty."""
        if self.total == 0:
            return 0.0
        target = q * self.total
        acc = 0
        for i, c in enumerate(self.counts):
            acc += c
            if acc >= target and c:
                if i == 0:
                    return self._lo
                return self._lo * math.exp((i - 0.5) / self._inv_log)
        return self._lo * math.exp((len(self.counts) - 1) / self._inv_log)
