"""Prometheus exposition of the server's figures under vLLM's metric names (v1 engine, ``vllm/v1/metrics``).

The hot path keeps its own cheap counters and histograms (one ITL observation per step for all streams
that decoded in it); a :class:`EngineCollector` turns them into metric families when ``/metrics`` is read,
and prometheus-client writes the text (names, label escaping, cumulative buckets).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from services.engine_server.figures import ClockLag, RequestHistograms
from shared.core.engine import Engine
from shared.core.engine.stats import Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class FigureSource(Protocol):
    """What the collector reads: the runner's engine, histograms and clock lag."""

    engine: Engine
    hists: RequestHistograms
    lag: ClockLag


@dataclass(frozen=True, slots=True)
class LoraInfo:
    """What ``vllm:lora_requests_info`` reports: the slot count and adapters running / waiting."""

    max_lora: int = 0
    running: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()


def _histogram(name: str, doc: str, h: Histogram, labels: dict[str, str]) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=list(labels))
    acc = 0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip(h.bounds, h.counts, strict=False):
        acc += count
        buckets.append((repr(float(bound)), acc))
    buckets.append(("+Inf", h.total))
    fam.add_metric(list(labels.values()), buckets, h.sum)
    return fam


def engine_labels(model_name: str) -> dict[str, str]:
    """vLLM's labels on every engine family (one engine per server, so ``engine`` is always 0)."""
    return {"model_name": model_name, "engine": "0"}


def _one(kind: type[GaugeMetricFamily] | type[CounterMetricFamily], name: str, doc: str, value: float,
         labels: dict[str, str]) -> Metric:
    fam = kind(name, doc, labels=list(labels))
    fam.add_metric(list(labels.values()), value)
    return fam


class EngineCollector(Collector):
    """Reads a runner's engine on every scrape and yields vLLM's metric families."""

    def __init__(self, runner: FigureSource, model_name: str, lora: Callable[[], LoraInfo] = LoraInfo) -> None:
        self.runner = runner
        self.labels = engine_labels(model_name)
        self.lora = lora

    def collect(self) -> Iterator[Metric]:
        """Every family, from the engine's current state."""
        r, lab = self.runner, self.labels
        s = r.engine.scheduler
        c, h, lag = s.counters, r.hists, r.lag
        g, k = GaugeMetricFamily, CounterMetricFamily
        yield _one(g, "vllm:num_requests_running", "Number of requests in model execution batches.",
                   len(s.running), lab)
        yield _one(g, "vllm:num_requests_waiting", "Number of requests waiting to be processed.", s.num_waiting, lab)
        yield _one(g, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_usage, lab)
        yield _one(g, "vllm:gpu_cache_usage_perc", "GPU KV-cache usage (pre-v0.10 name). 1 means 100 percent.",
                   s.kv_usage, lab)
        cfg = s.config
        yield _one(g, "vllm:cache_config_info", "Information of the KV cache config.", 1,
                   {**lab, "block_size": str(cfg.block_size), "num_gpu_blocks": str(cfg.num_gpu_blocks),
                    "enable_prefix_caching": str(cfg.enable_prefix_caching)})
        lo = self.lora()
        yield _one(g, "vllm:lora_requests_info", "Running stats on LoRA requests (value: when sampled).",
                   time.time(), {"max_lora": str(lo.max_lora), "running_lora_adapters": ",".join(lo.running),
                                 "waiting_lora_adapters": ",".join(lo.waiting)})
        yield _one(k, "vllm:prefix_cache_queries", "Prefix cache queries, in tokens.", c.prefix_queries, lab)
        yield _one(k, "vllm:prefix_cache_hits", "Prefix cache hits, in tokens.", c.prefix_hits, lab)
        yield _one(k, "vllm:num_preemptions", "Cumulative number of preemptions.", c.preemptions, lab)
        yield _one(k, "vllm:prompt_tokens", "Number of prefill tokens processed.", c.prompt_tokens, lab)
        yield _one(k, "vllm:generation_tokens", "Number of generation tokens processed.", c.generation_tokens, lab)
        yield _one(k, "vllm:prompt_tokens_cached", "Prompt tokens served from the prefix cache.",
                   h.cached_prompt_tokens, lab)
        done = k("vllm:request_success", "Count of successfully processed requests.",
                 labels=[*lab, "finished_reason"])
        for reason in ("stop", "length", "abort"):
            done.add_metric([*lab.values(), reason], c.finished_by_reason.get(reason, 0))
        yield done
        for name, doc, hist in (
            ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", h.ttft),
            ("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", h.itl),
            ("vllm:time_per_output_token_seconds", "Histogram of time per output token (pre-v0.11 name).", h.itl),
            ("vllm:request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds per request.",
             h.tpot),
            ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", h.e2e),
            ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", h.queue),
            ("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.", h.prefill),
            ("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.", h.decode),
            ("vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.",
             h.inference),
            ("vllm:request_prompt_tokens", "Number of prefill tokens processed.", h.prompt_len),
            ("vllm:request_generation_tokens", "Number of generation tokens processed.", h.output_len),
            ("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", h.fold_steps()),
        ):
            yield _histogram(name, doc, hist, lab)
        yield _one(g, "gantry:engine_clock_lag_seconds",
                   "Wall seconds the last step's tokens went out after their emulated time.", lag.last_s, lab)
        yield _one(g, "gantry:engine_clock_lag_max_seconds", "Largest such lag since start.", lag.max_s, lab)
        yield _one(k, "gantry:engine_clock_resyncs", "Steps that fell too far behind the emulated clock to catch up.",
                   lag.resyncs, lab)
        yield _one(k, "gantry:engine_loop_busy_seconds", "Wall seconds the step loop spent working, not sleeping.",
                   lag.busy_s, lab)
        yield _one(k, "gantry:engine_steps", "Engine steps run.", lag.steps, lab)


class DropCounts(Protocol):
    """What :class:`PublisherCollector` reads: the NATS publisher's counts of what it dropped."""

    kv_dropped: int
    snapshot_dropped: int


class PublisherCollector(Collector):
    """The NATS publisher's drops on every scrape (the publisher only increments two integers; nothing is added
    to the step loop)."""

    def __init__(self, publisher: DropCounts, model_name: str) -> None:
        self.publisher = publisher
        self.labels = engine_labels(model_name)

    def collect(self) -> Iterator[Metric]:
        """Both drop counters."""
        p, k, lab = self.publisher, CounterMetricFamily, self.labels
        yield _one(k, "gantry:engine_kv_events_dropped",
                   "KV-event batches dropped unpublished: NATS was unreachable and the backlog was full. Non-zero: "
                   "routers following this engine's prefix cache missed those events (a gap in its KV numbering) "
                   "and misjudged what it caches until a snapshot repaired their index.", p.kv_dropped, lab)
        yield _one(k, "gantry:engine_kv_snapshot_requests_dropped",
                   "Prefix-cache snapshot requests dropped unanswered: too many were waiting. Non-zero: a router's "
                   "request timed out and it went on with KV events alone, so its index of this engine's cache lacks "
                   "what was cached before them (or lost in a gap).", p.snapshot_dropped, lab)


class ZmqOverflowCount(Protocol):
    """What :class:`ZmqPublisherCollector` reads: how often a ZMQ subscriber's queue was full."""

    overflows: int


class ReplayCounts(Protocol):
    """What :class:`ZmqPublisherCollector` reads of a replay endpoint: replays answered, requests refused."""

    replays: int
    refused: dict[str, int]


class ZmqPublisherCollector(Collector):
    """The ZMQ publisher's overflows on every scrape (it increments one integer, on a failed send only), and with a
    replay endpoint its replays and refusals."""

    def __init__(self, publisher: ZmqOverflowCount, model_name: str, replay: ReplayCounts | None = None) -> None:
        self.publisher = publisher
        self.replay = replay
        self.labels = engine_labels(model_name)

    def collect(self) -> Iterator[Metric]:
        """The overflow counter; the replay counters when there is a replay endpoint."""
        yield _one(CounterMetricFamily, "gantry:engine_zmq_kv_subscriber_overflows",
                   "Times a --kv-events-zmq subscriber's queue (high-water mark) was full when a KV-event batch was "
                   "sent: it missed that batch and the next ones until it caught up. Non-zero: a ZMQ consumer read "
                   "too slowly and saw gaps in the sequence frame; unless it asked the replay endpoint "
                   "(--kv-events-replay-endpoint) for them, its index of this engine's prefix cache lacks those "
                   "events.", self.publisher.overflows, self.labels)
        if self.replay is None:
            return
        yield _one(CounterMetricFamily, "gantry:engine_zmq_kv_replays",
                   "Replay requests answered on --kv-events-replay-endpoint: each got the kept KV-event batches from "
                   "the number it asked for on, then the end marker.", self.replay.replays, self.labels)
        fam = CounterMetricFamily(
            "gantry:engine_zmq_kv_replay_refused",
            "Replay requests refused or cut short, by reason: malformed (not vLLM's request frames, or a sequence "
            "number never sent), busy (too many replays at once, or one already running for that requester), "
            "abandoned (the requester stopped reading or left mid-replay). Each refused one got the end marker "
            "alone. Non-zero: a consumer that asked did not get what it missed.",
            labels=[*self.labels, "reason"])
        for reason, n in self.replay.refused.items():
            fam.add_metric([*self.labels.values(), reason], n)
        yield fam


class RequestLogCounts(Protocol):
    """What :class:`RequestLogCollector` reads: lines the request log's file took and lines it dropped."""

    written: int
    lost: int


class RequestLogCollector(Collector):
    """The request log's lines on every scrape: a log turned off by a full disk or a slow reader is seen here, not
    only in one warning line (the log keeps two integers; nothing is added to the step loop)."""

    def __init__(self, request_log: RequestLogCounts, model_name: str) -> None:
        self.request_log = request_log
        self.labels = engine_labels(model_name)

    def collect(self) -> Iterator[Metric]:
        """Both line counters."""
        r, k, lab = self.request_log, CounterMetricFamily, self.labels
        yield _one(k, "gantry:engine_request_log_lines_written",
                   "Ended requests whose line the --request-log file or pipe took.", r.written, lab)
        yield _one(k, "gantry:engine_request_log_lines_lost",
                   "Ended requests whose line was dropped: the log was turned off (a full disk, a reader gone or not "
                   "keeping up) or not open. Non-zero: the log no longer holds every request, so figures read from it "
                   "(exact TTFT quantiles) cover only part of the traffic.", r.lost, lab)


def registry_for(collector: EngineCollector, *more: Collector) -> CollectorRegistry:
    """A registry of its own per server (several embedded servers may share a process)."""
    reg = CollectorRegistry(auto_describe=False)
    for c in (collector, *more):
        reg.register(c)
    return reg


def render(registry: CollectorRegistry) -> bytes:
    """The ``/metrics`` body."""
    return generate_latest(registry)
