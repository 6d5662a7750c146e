"""``gantry simulate``: replay a trace on N emulated replicas in virtual time and report latencies."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer

from ops.cli.common import MAX_WAIT_S, seconds, whole
from ops.cli.errors import CliError, quoted
from shared.catalog import UnknownGpuError, UnknownModelError, load_gpu_spec, load_model_arch
from shared.core.engine import CalibratedStepTime, RooflineStepTime, SchedulerConfig
from shared.core.engine.step_time import RooflineParams
from shared.core.limits import MAX_GPUS_PER_REPLICA, MAX_REPLICAS
from shared.core.sim import ROUTERS, ClusterSpec, SimResult, make_router
from shared.core.sim import simulate as run_sim
from shared.core.sim.gantry import make_gantry
from shared.core.sim.routers import Router, is_gantry
from shared.traces import TRACES, TraceError, load_trace

MAX_ROUTER_REPLICAS = 256  # HA gateways in front of the replicas; each one keeps its own routing state
SLO_MAX_MS = MAX_WAIT_S * 1000  # a goodput SLO in plain digits (float() read 1_0 as 10, and other scripts' digits)
MAX_SIM_KV_BLOCKS = 1 << 23  # KV blocks over all replicas (~1 GB of block tables): 300 8B replicas on H100s


def build_cluster(
    model: str, gpu: str, replicas: int, tp: int = 1, router: str = "rr", *, block_size: int = 16,
    max_num_seqs: int = 256, max_num_batched_tokens: int = 8192, gpu_mem_util: float = 0.9,
    prefix_caching: bool = True, calibration: tuple[float, float, float] | None = None, router_replicas: int = 1,
) -> ClusterSpec:
    """A cluster of identical replicas from friendly catalogue names; raises ValueError on bad input."""
    if router not in ROUTERS and not is_gantry(router):
        raise ValueError(f"unknown router {quoted(router)}; known: {', '.join(ROUTERS)}, gantry[:PROFILE]")
    if not 1 <= router_replicas <= MAX_ROUTER_REPLICAS:
        raise ValueError(f"--router-replicas must be between 1 and {MAX_ROUTER_REPLICAS} (got {router_replicas})")
    def make() -> Router:
        return make_router(router) if router_replicas == 1 else make_gantry(router, router_replicas)

    if is_gantry(router):
        make()  # an unknown profile fails here, before any simulation
    if replicas < 1 or tp < 1:
        raise ValueError("--replicas and --tp must be >= 1")
    if replicas > MAX_REPLICAS or tp > MAX_GPUS_PER_REPLICA:
        raise ValueError(f"--replicas must be <= {MAX_REPLICAS} and --tp <= {MAX_GPUS_PER_REPLICA}")
    arch, spec = load_model_arch(model), load_gpu_spec(gpu)
    step = RooflineStepTime(arch, spec, tp=tp, params=RooflineParams(gpu_mem_utilization=gpu_mem_util))
    blocks = step.kv_capacity_blocks(block_size)
    if blocks < 2:
        raise ValueError(f"{arch.key} does not fit on {tp}x {spec.key}: no memory left for the KV cache")
    cfg = SchedulerConfig(
        block_size=block_size,
        num_gpu_blocks=blocks + 1,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        enable_prefix_caching=prefix_caching,
        enable_kv_events=is_gantry(router),
        max_model_len=min(arch.max_position_embeddings or 1 << 30, blocks * block_size),
    )
    if problems := cfg.problems():
        raise ValueError("; ".join(problems))
    if replicas * blocks > MAX_SIM_KV_BLOCKS:  # every replica holds its KV block table in memory
        raise ValueError(f"{replicas} replicas x {blocks} KV blocks exceed the simulator's {MAX_SIM_KV_BLOCKS} "
                         "blocks: use fewer replicas or a smaller --tp")
    if calibration is not None:
        ttft_ms, itl_ms, tok_s = calibration
        if not all(math.isfinite(x) and x > 0 for x in calibration):
            raise ValueError(f"calibration figures must be finite and > 0 (got {calibration})")
        # beyond these the step model's coefficients overflow or vanish: nothing completes, figures are NaN
        if not (ttft_ms <= 1e6 and itl_ms <= 1e6 and 1e-3 <= tok_s <= 1e9):
            raise ValueError(f"calibration figures out of range: TTFT and ITL at most 1e6 ms, throughput between "
                             f"1e-3 and 1e9 tokens/s (got {calibration})")
        cal = CalibratedStepTime.from_anchors(ttft_ms / 1000, 1024, itl_ms / 1000, tok_s, batch=256, context=1024)
        return ClusterSpec(replicas, cfg, cal, router=make)
    return ClusterSpec(replicas, cfg, step, router=make)


def _json(doc: object) -> str:
    """``doc`` as strict JSON: a figure that is no number (NaN, an infinity) is an error, never a bare ``NaN``
    token that jq or a JavaScript or Go reader refuses after a run that said it succeeded."""
    try:
        return json.dumps(doc, allow_nan=False)
    except ValueError:
        raise CliError("the run produced figures that are not numbers (did any request complete?)",
                       exit_code=1) from None


def simulate(
    trace: Annotated[str, typer.Option(help=f"trace name ({', '.join(TRACES)}) or a CSV/JSONL path")] = "azure-conv",
    model: Annotated[str, typer.Option(help="model name from the catalogue (e.g. llama-3.1-8b)")] = "llama-3.1-8b",
    gpu: Annotated[str, typer.Option(help="GPU name (e.g. H100-SXM-80GB)")] = "H100-SXM-80GB",
    replicas: Annotated[int, whole(help="number of replicas")] = 16,
    tp: Annotated[int, whole(help="tensor-parallel GPUs per replica")] = 1,
    router: Annotated[str, typer.Option(
        help="rr (round robin), least (least outstanding requests), or gantry[:PROFILE] (the routing core with a "
             "built-in profile: default, gie, approx-prefix, precise-prefix, power-of-two, least-tokens)")] = "rr",
    router_replicas: Annotated[int, whole(
        help="gantry routers in front of the replicas (HA gateways behind a round-robin balancer)")] = 1,
    time_scale: Annotated[float, typer.Option(help="divide arrival times by this (2 = twice the rate)")] = 1.0,
    limit: Annotated[int | None, whole(help="use only the first N requests")] = None,
    max_num_seqs: Annotated[int, whole(help="running-request cap per replica")] = 256,
    max_num_batched_tokens: Annotated[int, whole(help="token budget per step")] = 8192,
    no_prefix_caching: Annotated[bool, typer.Option("--no-prefix-caching")] = False,
    calibrated: Annotated[str | None, typer.Option(
        help="use the calibrated step model instead of the roofline: 'TTFT_MS,ITL_MS,TOK_S' = TTFT of a 1k "
             "prompt, ITL at batch 1, decode tokens/s at batch 256 (1k context), as measured on real hardware",
    )] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
    plot: Annotated[Path | None, typer.Option(help="write a PNG of latency over time here")] = None,
    broker: Annotated[str | None, typer.Option(help="request broker per replica: local, global or splitwise")] = None,
    scheduler: Annotated[list[str] | None, typer.Option(
        help="broker parameter KEY=VALUE by the seed's name, durations in seconds or with a unit "
             "(e.g. scheduler_ttl=30s, scheduler_max_size=64); repeatable")] = None,
    skew: Annotated[float | None, typer.Option(help="share of arrivals landing on replica 0 (broker runs)")] = None,
    prefill_nodes: Annotated[int, whole(help="splitwise: replicas that prefill (the rest decode)")] = 0,
    kv_gbps: Annotated[float, typer.Option(help="splitwise: KV link bandwidth, GB/s")] = 50.0,
    router_queue: Annotated[bool, typer.Option("--router-queue", help="hold requests at the router until a "
                                               "replica has headroom (broker runs)")] = False,
    kill: Annotated[str | None, typer.Option(help="NODE@SECONDS: that replica dies then (broker runs)")] = None,
    slo_ttft_ms: Annotated[float, seconds(0, SLO_MAX_MS, "milliseconds", help="goodput SLO on TTFT (broker runs)")
                           ] = 2000.0,
    slo_tpot_ms: Annotated[float, seconds(0, SLO_MAX_MS, "milliseconds",
                                          help="goodput SLO on time per output token (broker runs)")] = 100.0,
    progress: Annotated[bool | None, typer.Option(
        "--progress/--no-progress", help="a progress bar on stderr (default: when stderr is a terminal)")] = None,
) -> None:
    """Replay a trace on N emulated replicas in virtual time; print TTFT/ITL/e2e, throughput, KV, preemptions."""
    try:
        _check_slo(slo_ttft_ms, slo_tpot_ms)
        if plot is not None and plot.is_dir():  # found before the run, not after minutes of simulation
            raise ValueError(f"--plot {plot} is a directory; give a .png file name")
        cal = _parse_calibration(calibrated) if calibrated else None
        spec = build_cluster(model, gpu, replicas, tp, router, max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_num_batched_tokens, prefix_caching=not no_prefix_caching,
                             calibration=cal, router_replicas=router_replicas)
        if not trace.strip():  # (an empty path is the current directory)
            raise TraceError("--trace is empty: give a trace name or a CSV/JSONL path")
        reqs = load_trace(trace, time_scale, limit)
    except (UnknownModelError, UnknownGpuError) as err:
        raise CliError(err.message(quoted), exit_code=2) from None
    except (TraceError, ValueError) as err:
        raise CliError(str(err), exit_code=2) from None
    if not reqs:
        raise CliError(f"trace {quoted(trace)} has no requests", exit_code=2)
    if broker is not None:
        from ops.cli.simulate_broker import parse_kill, parse_scheduler_options, render_brokered, run_brokered

        try:
            params = parse_scheduler_options(scheduler or [], broker)
            bs = run_brokered(reqs, spec, params, skew=skew, prefill_nodes=prefill_nodes, kv_gbps=kv_gbps,
                              router_queue=router_queue, kill=parse_kill(kill), slo_ttft_s=slo_ttft_ms / 1000,
                              slo_tpot_s=slo_tpot_ms / 1000)
        except ValueError as err:
            raise CliError(str(err), exit_code=2) from None
        typer.echo(_json(bs) if as_json else render_brokered(bs))
        return
    t0 = time.perf_counter()
    with progress_bar(len(reqs), progress) as report:
        result = run_sim(reqs, spec, progress=report)
    wall = time.perf_counter() - t0
    summary = result.summary()
    summary["setup"] = {"trace": trace, "model": model, "gpu": gpu, "replicas": replicas, "tp": tp,
                        "router": router, "router_replicas": router_replicas, "time_scale": time_scale,
                        "step_model": "calibrated" if calibrated else "roofline",
                        "kv_blocks_per_replica": spec.config.num_gpu_blocks - 1}
    summary["wall_s"] = wall
    summary["speedup_vs_real_time"] = float(summary["makespan_s"]) / wall  # type: ignore[arg-type]
    if plot is not None:
        try:
            write_plot(result, plot)
        except (OSError, ValueError) as err:
            raise CliError(f"cannot write --plot {plot}: {err}", exit_code=2) from None
    if as_json:
        typer.echo(_json(summary))
    else:
        typer.echo(render(summary))


@contextlib.contextmanager
def progress_bar(total: int, wanted: bool | None) -> Iterator[Callable[[int, int], None] | None]:
    """A ``progress(done, total)`` callback drawing a bar on stderr, or None when not wanted (default: only
    when stderr is a terminal, so pipes and scripts get clean output)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not (console.is_terminal if wanted is None else wanted):
        yield None
        return
    columns = (TextColumn("simulating"), BarColumn(), MofNCompleteColumn(), TextColumn("requests"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("simulate", total=total)

        def report(done: int, _total: int) -> None:
            bar.update(task, completed=done)

        yield report


def _check_slo(ttft_ms: float, tpot_ms: float) -> None:
    if not all(math.isfinite(x) and x > 0 for x in (ttft_ms, tpot_ms)):
        raise ValueError(f"--slo-ttft-ms and --slo-tpot-ms must be finite and > 0 (got {ttft_ms}, {tpot_ms})")


def _parse_calibration(text: str) -> tuple[float, float, float]:
    parts = text.split(",")
    try:
        ttft, itl, toks = (float(p) for p in parts)
    except ValueError:
        raise ValueError(f"--calibrated wants 'TTFT_MS,ITL_MS,TOK_S' (e.g. 27,7.5,12000), got {quoted(text)}") from None
    return ttft, itl, toks


def render(s: dict[str, object]) -> str:
    """Human-readable summary."""
    def ms(d: object) -> str:
        assert isinstance(d, dict)
        return "  ".join(f"{k} {v * 1000:8.1f}" for k, v in d.items())
    setup = s["setup"]
    assert isinstance(setup, dict)
    thr, kv = s["throughput"], s["kv_usage"]
    assert isinstance(thr, dict) and isinstance(kv, dict)
    lines = [
        f"{setup['model']} on {setup['replicas']}x {setup['gpu']} (tp {setup['tp']}), router {setup['router']}, "
        f"trace {setup['trace']} x{setup['time_scale']}: {s['completed']}/{s['requests']} requests "
        f"over {float(s['makespan_s']):.0f} s (simulated in {float(s['wall_s']):.1f} s, "  # type: ignore[arg-type]
        f"{float(s['speedup_vs_real_time']):.0f}x real time)",  # type: ignore[arg-type]
        f"  TTFT ms   {ms(s['ttft_s'])}",
        f"  ITL ms    {ms(s['itl_s'])}",
        f"  TPOT ms   {ms(s['tpot_s'])}",
        f"  e2e ms    {ms(s['e2e_s'])}",
        f"  queue ms  {ms(s['queue_s'])}",
        f"  throughput {thr['requests_per_s']:.2f} req/s, {thr['output_tokens_per_s']:.0f} output tok/s, "
        f"{thr['input_tokens_per_s']:.0f} input tok/s",
        f"  KV usage mean (busy) {kv['mean_busy']:.1%}, max {kv['max']:.1%}; preemptions {s['preemptions']} "
        f"({s['preempted_requests']} requests); prefix-cache hit rate {float(s['prefix_cache_hit_rate']):.1%}",  # type: ignore[arg-type]
    ]
    return "\n".join(lines)


def write_plot(result: SimResult, path: Path) -> None:
    """PNG: TTFT and e2e per request against arrival time, with a 60 s rolling median."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    done = [r for r in result.requests if r.finish_time >= 0]
    t = np.array([r.arrival_time for r in done])
    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for ax, vals, name in ((axes[0], [r.ttft for r in done], "TTFT"), (axes[1], [r.e2e for r in done], "e2e")):
        v = np.array(vals)
        ax.scatter(t, v, s=2, alpha=0.3)
        bins = np.arange(0, (t.max() if t.size else 0) + 60, 60)
        idx = np.digitize(t, bins)
        med = [np.median(v[idx == i]) if np.any(idx == i) else np.nan for i in range(1, len(bins))]
        ax.plot(bins[:-1] + 30, med, color="C1", label="60 s median")
        ax.set_ylabel(f"{name} (s)")
        ax.set_yscale("log")
        ax.legend(loc="upper right")
    axes[1].set_xlabel("arrival time (s)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # a failed or interrupted write leaves the old plot whole (the suffix kept: it names the format)
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        fig.savefig(partial, dpi=100)
        os.replace(partial, path)
    finally:
        plt.close(fig)
        partial.unlink(missing_ok=True)
