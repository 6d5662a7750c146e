"""``gantry simulate --broker MODE``: the trace through a request broker per replica (seed 003) in virtual time."""

from __future__ import annotations

import math
import time

from ops.cli.errors import quoted
from shared.core.engine import KVLink
from shared.core.queueing import SchedulerParams
from shared.core.sim import BrokeredSpec, ClusterSpec, simulate_brokered
from shared.core.sim.workload import TraceRequest


def parse_scheduler_options(items: list[str], name: str) -> SchedulerParams:
    """``scheduler_ttl=30s``-style options (the seed's names) on top of ``scheduler_name``; ParamError if bad."""
    raw: dict[str, object] = {"scheduler_name": name}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--scheduler wants KEY=VALUE with a seed parameter name (got {quoted(item)})")
        raw[key.strip()] = value.strip()
    return SchedulerParams.from_mapping(raw)


def parse_kill(text: str | None) -> tuple[int, float] | None:
    """``NODE@SECONDS`` (e.g. ``0@30``): that node dies at that virtual time."""
    if text is None:
        return None
    node, sep, at = text.partition("@")
    try:
        if not sep:
            raise ValueError
        when = float(at)
        if not (math.isfinite(when) and when >= 0):
            raise ValueError
        return int(node), when
    except ValueError:
        raise ValueError(f"--kill wants NODE@SECONDS, e.g. 0@30 (got {quoted(text)})") from None


def run_brokered(reqs: list[TraceRequest], cluster: ClusterSpec, params: SchedulerParams, *, skew: float | None,
                 prefill_nodes: int, kv_gbps: float, router_queue: bool, kill: tuple[int, float] | None,
                 slo_ttft_s: float, slo_tpot_s: float) -> dict[str, object]:
    """Run the brokered simulation of ``cluster``'s replicas; the summary with the setup and wall time."""
    if not (math.isfinite(kv_gbps) and kv_gbps > 0):  # NaN slips past "<= 0" and would poison every KV transfer
        raise ValueError(f"--kv-gbps must be a finite number > 0 (got {kv_gbps})")
    spec = BrokeredSpec(nodes=cluster.replicas, config=cluster.config, step_model=cluster.step_model,
                        params=params, router_queue=router_queue, skew=skew, prefill_nodes=prefill_nodes,
                        kv_link=KVLink(bandwidth_bytes_s=kv_gbps * 1e9, latency_s=1e-3), kill=kill)
    problems = spec.problems()
    if problems:
        raise ValueError("; ".join(problems))
    t0 = time.perf_counter()
    res = simulate_brokered(reqs, spec)
    summary = res.summary(slo_ttft_s, slo_tpot_s)
    summary["wall_s"] = time.perf_counter() - t0
    summary["broker"] = {"mode": params.name, "router_queue": router_queue, "skew": skew,
                         "prefill_nodes": prefill_nodes, "kv_gbps": kv_gbps, "kill": kill,
                         "ttl_s": params.ttl_s, "max_size": params.max_size, "min_load_score": params.min_load_score}
    return summary


def render_brokered(s: dict[str, object]) -> str:
    """Human-readable summary of a brokered run."""
    def ms(key: str) -> str:
        d = s[key]
        assert isinstance(d, dict)
        return f"p50 {d['p50'] * 1000:9.1f}  p99 {d['p99'] * 1000:9.1f}"
    b = s["broker"]
    assert isinstance(b, dict)
    return "\n".join([
        f"broker {b['mode']}{' + router queue' if b['router_queue'] else ''}: {s['completed']}/{s['requests']} "
        f"completed, {s['expired']} expired, {s['rejected']} rejected, {s['lost']} lost, {s['duplicated']} "
        f"duplicated; {s['stolen']} stolen, {s['recovered']} recovered",
        f"  queue ms  {ms('queue_s')}",
        f"  TTFT ms   {ms('ttft_s')}",
        f"  TPOT ms   {ms('tpot_s')}",
        f"  goodput {float(s['goodput_rps']):.2f} req/s ({float(s['good_fraction']):.1%} of requests within the SLO)",  # type: ignore[arg-type]
    ])
