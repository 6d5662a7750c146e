"""The pure decisions of a fleet that runs emulated engine servers (``--engines``): what server an instance
gets, what an engine's /metrics says about its load, and when a DRAINING instance is idle. No I/O here."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from shared.catalog import UnknownGpuError, UnknownModelError, load_gpu_spec, load_model_arch

RUNNING_METRIC = "vllm:num_requests_running"
WAITING_METRIC = "vllm:num_requests_waiting"


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """What an engine has in hand: requests in its batch and requests queued for it."""

    running: int
    waiting: int

    @property
    def empty(self) -> bool:
        """Nothing running and nothing waiting."""
        return self.running == 0 and self.waiting == 0


def engine_spec_args(model: str, source: str, gpu_product: str, gpus: int) -> list[str]:
    """The engine flags for an instance: the catalogue model its name (or else its source) names, emulated
    on its worker's GPU product with its GPU count as tensor parallelism; no flags (the server's default
    engine) when the catalogue does not know the model. An unknown GPU product keeps the server's default
    GPU."""
    arch = None
    for name in (model, source):
        if name:
            try:
                arch = load_model_arch(name)
                break
            except UnknownModelError:
                continue
    if arch is None:
        return []
    args = ["--model", arch.key, "--tp", str(max(1, gpus))]
    with contextlib.suppress(UnknownGpuError):
        args += ["--gpu", load_gpu_spec(gpu_product).key]
    return args


def parse_load(metrics_text: str) -> EngineLoad | None:
    """The running and waiting counts in an engine's Prometheus text (vLLM's metric names; every sample of
    a family summed, one per engine rank); None when either family is missing, the text is not Prometheus
    text, or a count is not a finite non-negative number (such an engine's load is unknown, not zero)."""
    found: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(metrics_text):
            for sample in family.samples:
                if sample.name in (RUNNING_METRIC, WAITING_METRIC):
                    found[sample.name] = found.get(sample.name, 0.0) + sample.value
    except ValueError:
        return None
    running, waiting = found.get(RUNNING_METRIC, math.nan), found.get(WAITING_METRIC, math.nan)
    if not (running >= 0 and waiting >= 0 and math.isfinite(running + waiting)):  # NaN fails every comparison
        return None
    return EngineLoad(running=int(running), waiting=int(waiting))


def drain_idle(load: EngineLoad | None, draining_for_s: float, settle_s: float) -> bool:
    """Whether a DRAINING instance may be reported idle: its engine says it has nothing running or waiting,
    and the drain is at least ``settle_s`` old (a request a router sent just before it heard of the drain
    may still be on its way to the server). An engine whose load is unknown is not idle (the drain timeout
    still ends the drain)."""
    return load is not None and load.empty and draining_for_s >= settle_s
