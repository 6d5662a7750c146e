"""Prometheus text exposition of the server's figures under vLLM's metric names."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.core.engine import Request
from shared.core.engine.stats import Histogram

_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
_ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass(slots=True)
class RequestHistograms:
    """Per-request latency histograms (seconds of model time)."""

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


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def _hist(lines: list[str], name: str, help_: str, h: Histogram, labels: dict[str, str]) -> None:
    lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
    acc = 0
    for bound, count in zip(h.bounds, h.counts, strict=False):
        acc += count
        lines.append(f"{name}_bucket{_labels({**labels, 'le': repr(float(bound))})} {acc}")
    lines.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {h.total}")
    lines.append(f"{name}_sum{_labels(labels)} {h.sum}")
    lines.append(f"{name}_count{_labels(labels)} {h.total}")


def render_metrics(
    *,
    model_name: str,
    running: int,
    waiting: int,
    kv_usage: float,
    block_size: int,
    num_gpu_blocks: int,
    counters: dict[str, int],
    finished_by_reason: dict[str, int],
    hists: RequestHistograms,
    lag: tuple[float, float, int, float, int] = (0.0, 0.0, 0, 0.0, 0),
) -> str:
    """The ``/metrics`` body."""
    lab = {"model_name": model_name}
    lines: list[str] = []

    def gauge(name: str, help_: str, value: float, labels: dict[str, str] = lab) -> None:
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name}{_labels(labels)} {value}"])

    def counter(name: str, help_: str, value: float) -> None:
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} counter", f"{name}{_labels(lab)} {value}"])

    gauge("vllm:num_requests_running", "Number of requests in model execution batches.", running)
    gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", waiting)
    gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", kv_usage)
    gauge("vllm:gpu_cache_usage_perc", "GPU KV-cache usage (pre-v0.10 name). 1 means 100 percent.", kv_usage)
    gauge("vllm:cache_config_info", "Information of the KV cache config.", 1,
          {**lab, "block_size": str(block_size), "num_gpu_blocks": str(num_gpu_blocks)})
    counter("vllm:prefix_cache_queries_total", "Prefix cache queries, in tokens.", counters["prefix_queries"])
    counter("vllm:prefix_cache_hits_total", "Prefix cache hits, in tokens.", counters["prefix_hits"])
    counter("vllm:num_preemptions_total", "Cumulative number of preemptions.", counters["preemptions"])
    counter("vllm:prompt_tokens_total", "Number of prefill tokens processed.", counters["prompt_tokens"])
    counter("vllm:generation_tokens_total", "Number of generation tokens processed.", counters["generation_tokens"])
    lines += ["# HELP vllm:request_success_total Count of successfully processed requests.",
              "# TYPE vllm:request_success_total counter"]
    for reason in ("stop", "length", "abort"):
        lines.append(f"vllm:request_success_total{_labels({**lab, 'finished_reason': reason})} "
                     f"{finished_by_reason.get(reason, 0)}")
    _hist(lines, "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", hists.ttft, lab)
    _hist(lines, "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", hists.itl, lab)
    _hist(lines, "vllm:time_per_output_token_seconds", "Histogram of time per output token (old name).",
          hists.itl, lab)
    _hist(lines, "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", hists.e2e, lab)
    _hist(lines, "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase.", hists.queue, lab)
    _hist(lines, "vllm:request_prompt_tokens", "Number of prefill tokens processed.", hists.prompt_len, lab)
    _hist(lines, "vllm:request_generation_tokens", "Number of generation tokens processed.", hists.output_len, lab)
    gauge("gantry:engine_clock_lag_seconds", "Wall seconds the last step's tokens went out after their model time.",
          lag[0])
    gauge("gantry:engine_clock_lag_max_seconds", "Largest such lag since start.", lag[1])
    counter("gantry:engine_clock_resyncs_total", "Steps that fell too far behind the emulated clock.", lag[2])
    counter("gantry:engine_loop_busy_seconds_total", "Wall seconds the step loop spent working, not sleeping.", lag[3])
    counter("gantry:engine_steps_total", "Engine steps run.", lag[4])
    return "\n".join(lines) + "\n"
