"""Discrete-event driver: replays arrivals in virtual time over N engines as fast as the CPU allows.

Between arrivals nothing external happens, so each engine runs its own steps up to the next arrival it
could see (``Engine.run_until``); only the router's view needs all replicas advanced, and only when the
router reads their state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from shared.core.engine import Engine, Request, SchedulerConfig, StepTimeModel
from shared.core.engine.stats import LogHistogram
from shared.core.sim.routers import RoundRobin, Router
from shared.core.sim.workload import TraceRequest


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """N identical replicas: scheduler config, step-time model and the router in front."""

    replicas: int
    config: SchedulerConfig
    step_model: StepTimeModel
    router: Callable[[], Router] = RoundRobin
    fast_forward: bool = True
    # per replica (heterogeneous pools): overrides of ``config`` / ``step_model`` by index
    configs: tuple[SchedulerConfig, ...] = ()
    step_models: tuple[StepTimeModel, ...] = ()


@dataclass(slots=True)
class SimResult:
    """Everything a simulation measured (virtual seconds)."""

    requests: list[Request]
    rejected: list[tuple[int, str]]
    engines: list[Engine]
    assignment: list[int] = field(default_factory=list)
    router: Router | None = None

    def summary(self) -> dict[str, object]:
        """Percentiles, throughput, KV usage, preemptions and prefix hits, as plain JSON-able values."""
        done = [r for r in self.requests if r.finish_time >= 0]
        ttft = np.array([r.ttft for r in done])
        e2e = np.array([r.e2e for r in done])
        tpot = np.array([r.mean_itl for r in done if r.num_output_tokens > 1])
        queue = np.array([r.queue_time for r in done])
        itl = LogHistogram()
        for e in self.engines:
            itl.merge(e.stats.itl)
        start = min((r.arrival_time for r in self.requests), default=0.0)
        end = max((r.finish_time for r in done), default=start)
        span = max(end - start, 1e-9)
        out_tokens = sum(r.num_output_tokens for r in done)
        counters = [e.scheduler.counters for e in self.engines]
        busy = sum(e.stats.busy_s for e in self.engines)

        def pct(a: np.ndarray) -> dict[str, float]:
            if a.size == 0:
                return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
            p50, p90, p99 = np.percentile(a, [50, 90, 99])
            return {"mean": float(a.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99),
                    "max": float(a.max())}

        queries = sum(c.prefix_queries for c in counters)
        return {
            "requests": len(self.requests) + len(self.rejected),
            "completed": len(done),
            "rejected": len(self.rejected),
            "makespan_s": span,
            "ttft_s": pct(ttft),
            "itl_s": {"mean": itl.sum / itl.total if itl.total else 0.0, "p50": itl.quantile(0.5),
                      "p90": itl.quantile(0.9), "p99": itl.quantile(0.99)},
            "tpot_s": pct(tpot),
            "e2e_s": pct(e2e),
            "queue_s": pct(queue),
            "throughput": {"requests_per_s": len(done) / span, "output_tokens_per_s": out_tokens / span,
                           "input_tokens_per_s": sum(r.prompt_len for r in done) / span},
            "kv_usage": {
                "mean_busy": sum(e.stats.kv_usage_integral for e in self.engines) / busy if busy else 0.0,
                "max": max((e.stats.kv_usage_max for e in self.engines), default=0.0),
            },
            "preemptions": sum(c.preemptions for c in counters),
            "preempted_requests": sum(1 for r in done if r.num_preemptions),
            "prefix_cache_hit_rate": sum(c.prefix_hits for c in counters) / queries if queries else 0.0,
            "steps": sum(c.steps for c in counters),
            "fast_forwarded_steps": sum(e.stats.fast_steps for e in self.engines),
            "replica_utilization": busy / (span * len(self.engines)),
        }


def simulate(
    trace: Sequence[TraceRequest], spec: ClusterSpec, progress: Callable[[int, int], None] | None = None
) -> SimResult:
    """Replay ``trace`` (sorted by arrival) on ``spec.replicas`` engines in virtual time; ``progress(done,
    total)`` is called about every 1 % of the arrivals and once when every request has finished (the caller
    shows it; the simulation itself does no I/O)."""
    stride = max(1, len(trace) // 100)
    engines = [Engine(spec.configs[k] if k < len(spec.configs) else spec.config,
                      spec.step_models[k] if k < len(spec.step_models) else spec.step_model,
                      fast_forward=spec.fast_forward) for k in range(spec.replicas)]
    router = spec.router()
    requests: list[Request] = []
    rejected: list[tuple[int, str]] = []
    assignment: list[int] = []
    for i, tr in enumerate(trace):
        if progress is not None and i % stride == 0:
            progress(i, len(trace))
        t = tr.arrival_s
        if router.needs_state:
            for e in engines:
                e.run_until(t)
        req = Request(
            str(i),
            prompt_len=tr.prompt_len,
            prefix_ids=tr.prefix_ids,
            prefix_unit=tr.prefix_unit,
            max_tokens=tr.output_len,
            ignore_eos=True,
            arrival_time=t,
            uid=i,
        )
        k = router.pick(engines, t, req)
        if isinstance(k, str):  # the router refused it (e.g. 429 shed): counted, never silently lost
            rejected.append((i, k))
            continue
        eng = engines[k]
        eng.run_until(t)
        try:
            eng.add_request(req)
        except ValueError as err:
            rejected.append((i, str(err)))
            router.failed(req)
            continue
        requests.append(req)
        assignment.append(k)
    for e in engines:
        e.run_until(float("inf"))
    if progress is not None:
        progress(len(trace), len(trace))
    return SimResult(requests, rejected, engines, assignment, router)
