"""Cluster commands: deploy, scale, models, instances, workers, explain, cordon, uncordon, events."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple

import typer

from ops.cli.client import (
    deploy_files,
    desired_of,
    parse_target,
    read_snapshot,
    removal,
    require_model,
    require_worker,
    scale_command,
    send_cordon,
    send_remove_worker,
    send_scale,
    wait_for,
)
from ops.cli.common import JsonFlag, NatsUrl, RedisUrl, connect_nats, connect_redis, console, load, print_json, run
from ops.cli.errors import CliError
from ops.cli.inputs import event_count, model_name, replica_count
from ops.view import ClusterSnapshot, gib, gpu_usage, models_table, pending_groups, state_counts
from shared.bus import subjects
from shared.core.limits import bad_worker_name
from shared.core.placement.domain import Instance, InstanceState, WorkerState

if TYPE_CHECKING:  # NATS and the bus messages (numpy) load only in the commands that use them (issue 17)
    from nats.aio.client import Client as NatsClient

    from shared.bus.messages import UnschedulableEvent
    from shared.settings import Settings

Wait = Annotated[bool, typer.Option("--wait", help="wait until every replica is RUNNING")]
Timeout = Annotated[float, typer.Option(min=0, help="seconds --wait waits before giving up")]


def register(app: typer.Typer) -> None:
    """Add the cluster commands."""
    for name, fn in (
        ("deploy", deploy), ("delete", delete), ("models", models), ("instances", instances),
        ("explain", explain), ("cordon", cordon), ("uncordon", uncordon), ("events", events),
    ):
        app.command(name)(fn)
    # `gantry scale m -1` must reach the range check ("replicas must be between ..."), not read as an option
    app.command("scale", context_settings={"ignore_unknown_options": True})(scale)
    group = typer.Typer(invoke_without_command=True, no_args_is_help=False)
    group.callback()(workers)
    group.command("remove")(workers_remove)
    app.add_typer(group, name="workers")


# -- writes -----------------------------------------------------------------------------------------


def deploy(
    files: Annotated[list[Path], typer.Argument(help="model spec YAML file(s)", show_default=False)],
    wait: Wait = False,
    timeout: Timeout = 60.0,
    nats_url: NatsUrl = None,
    redis_url: RedisUrl = None,
) -> None:
    """Deploy (or update) models from spec files: replicas, placement strategy, selectors, ..."""
    settings = load(nats_url, redis_url)

    async def go() -> None:
        specs = await deploy_files(settings, files)
        for spec in specs:
            typer.echo(f"deployed {spec.name}: {spec.replicas} replica(s), {spec.placement_strategy.value}")
        if wait:
            await _wait_running(settings, {s.name: s.replicas for s in specs}, timeout)

    run(go)


def scale(
    model: Annotated[str, typer.Argument(help="a deployed model's name", show_default=False)],
    replicas: Annotated[int, typer.Argument(help="desired replicas (0 removes all)", show_default=False)],
    wait: Wait = False,
    timeout: Timeout = 60.0,
    nats_url: NatsUrl = None,
    redis_url: RedisUrl = None,
) -> None:
    """Set the desired replicas of a deployed model."""
    model_name(model)
    replica_count(replicas)
    settings = load(nats_url, redis_url)

    async def go() -> None:
        redis = await connect_redis(settings)
        try:
            await require_model(redis, model)
        finally:
            await redis.aclose()
        nc = await connect_nats(settings)
        try:
            await send_scale(nc, scale_command(model, replicas))
        finally:
            await nc.close()
        typer.echo(f"scaling {model} to {replicas} replica(s)")
        if wait:
            await _wait_running(settings, {model: replicas}, timeout)

    run(go)


def delete(
    model: Annotated[str, typer.Argument(help="a deployed model's name", show_default=False)],
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="wait until every replica is gone")] = True,
    timeout: Timeout = 60.0,
    nats_url: NatsUrl = None,
    redis_url: RedisUrl = None,
) -> None:
    """Remove a model: every replica is stopped and its GPUs freed; `gantry models` no longer lists it.
    Its spec stays recorded, so `gantry deploy FILE` (or `gantry scale MODEL N`) brings it back."""
    model_name(model)
    settings = load(nats_url, redis_url)

    async def go() -> None:
        redis = await connect_redis(settings)
        try:
            await require_model(redis, model)
            nc = await connect_nats(settings)
            try:
                await send_scale(nc, scale_command(model, 0))
            finally:
                await nc.close()
            if not wait:
                typer.echo(f"deleting {model}: its replicas are being stopped")
                return
            try:
                await wait_for(redis, settings, lambda s: all(i.model != model for i in s.instances), timeout)
            except TimeoutError:
                left = sum(1 for i in (await read_snapshot(redis, settings, model)).instances)
                raise CliError(f"{model}: {left} replica(s) still stopping after {timeout:g}s; "
                               "`gantry instances -m MODEL` shows them") from None
        finally:
            await redis.aclose()
        typer.echo(f"deleted {model}")

    run(go)


async def _wait_running(settings: Settings, wanted: dict[str, int], timeout: float) -> None:
    """Until each model has exactly its desired replicas, all RUNNING; exit 1 with counts on timeout."""

    def settled(snapshot: ClusterSnapshot) -> bool:
        for model, count in wanted.items():
            states = state_counts(i for i in snapshot.instances if i.model == model)
            if states["RUNNING"] != count or sum(states.values()) != count:
                return False
        return True

    redis = await connect_redis(settings)
    try:
        await wait_for(redis, settings, settled, timeout)
    except TimeoutError:
        snapshot = await read_snapshot(redis, settings)
        for model, count in wanted.items():
            states = state_counts(i for i in snapshot.instances if i.model == model)
            seen = " ".join(f"{k}={v}" for k, v in sorted(states.items())) or "no instances"
            typer.echo(f"{model}: wanted {count} RUNNING, have {seen}", err=True)
        raise CliError(f"not settled within {timeout:g}s; `gantry explain MODEL` says why") from None
    finally:
        await redis.aclose()
    for model, count in wanted.items():
        typer.echo(f"{model}: {count}/{count} RUNNING")


def cordon(
    target: Annotated[str, typer.Argument(help="WORKER or WORKER:GPU-INDEX", show_default=False)],
    timeout: Timeout = 10.0,
    nats_url: NatsUrl = None,
    redis_url: RedisUrl = None,
) -> None:
    """Stop placing new replicas on a worker, or on one GPU of it (running replicas stay)."""
    _cordon(target, True, timeout, load(nats_url, redis_url))


def uncordon(
    target: Annotated[str, typer.Argument(help="WORKER or WORKER:GPU-INDEX", show_default=False)],
    timeout: Timeout = 10.0,
    nats_url: NatsUrl = None,
    redis_url: RedisUrl = None,
) -> None:
    """Make a cordoned worker or GPU schedulable again."""
    _cordon(target, False, timeout, load(nats_url, redis_url))


def _cordon(target: str, cordoned: bool, timeout: float, settings: Settings) -> None:
    worker, gpu = parse_target(target)

    def applied(snapshot: ClusterSnapshot) -> bool:
        w = next((w for w in snapshot.workers if w.name == worker), None)
        if w is None:
            return False
        if gpu is None:
            return w.cordoned == cordoned
        return any(g.index == gpu and g.schedulable != cordoned for g in w.gpus)

    async def go() -> None:
        redis = await connect_redis(settings)
        try:
            await require_worker(redis, worker, gpu)
            from shared.bus.messages import CordonCommand

            nc = await connect_nats(settings)
            try:
                await send_cordon(nc, CordonCommand(worker=worker, cordoned=cordoned, gpu_index=gpu))
            finally:
                await nc.close()
            try:
                await wait_for(redis, settings, applied, timeout)
            except TimeoutError:
                raise CliError(f"sent, but not applied within {timeout:g}s: is the reconciler running?") from None
        finally:
            await redis.aclose()
        verb = "cordoned" if cordoned else "uncordoned"
        typer.echo(f"{verb} {target}")

    run(go)


def workers_remove(
    name: Annotated[str, typer.Argument(help="a worker that is gone for good", show_default=False)],
    timeout: Timeout = 10.0,
    nats_url: NatsUrl = None,
    redis_url: RedisUrl = None,
) -> None:
    """Forget a worker that is no longer heard from; its replicas are replaced elsewhere. A live worker is
    refused: stop it first (it would register again)."""
    settings = load(nats_url, redis_url)
    bad = bad_worker_name(name)
    if bad:
        raise CliError(bad, exit_code=2)

    async def go() -> int:
        redis = await connect_redis(settings)
        try:
            snapshot = await read_snapshot(redis, settings)
            step = removal(snapshot, name, settings)
            if isinstance(step, str):
                raise CliError(step)
            from shared.bus.messages import RemoveWorkerCommand

            nc = await connect_nats(settings)
            try:
                await send_remove_worker(nc, RemoveWorkerCommand(worker=name))
            finally:
                await nc.close()
            try:
                await wait_for(redis, settings, lambda s: all(w.name != name for w in s.workers), timeout)
            except TimeoutError:
                raise CliError(
                    f"sent, but {name} was not removed within {timeout:g}s: see `gantry events --dead-letters`"
                ) from None
            return len(step.forget)
        finally:
            await redis.aclose()

    count = run(go)
    typer.echo(f"removed {name}" + (f"; {count} replica record(s) on it are replaced elsewhere" if count else ""))


# -- reads ------------------------------------------------------------------------------------------


async def _snapshot(settings: Settings, model: str | None = None) -> ClusterSnapshot:
    redis = await connect_redis(settings)
    try:
        if model is not None:
            await require_model(redis, model)
        return await read_snapshot(redis, settings, model)
    finally:
        await redis.aclose()


def models(
    show_all: Annotated[bool, typer.Option("--all", help="also list deleted models (0 desired, no replicas)")] = False,
    json_out: JsonFlag = False,
    nats_url: NatsUrl = None,
    redis_url: RedisUrl = None,
) -> None:
    """Deployed models: desired replicas and instances by state."""
    snapshot = run(lambda: _snapshot(load(nats_url, redis_url)))
    if not show_all:
        snapshot = without_deleted(snapshot)
    if json_out:
        print_json([
            {
                "name": m.name, "desired": m.desired, "spec": m.spec,
                "instances": dict(state_counts(i for i in snapshot.instances if i.model == m.name)),
            }
            for m in sorted(snapshot.models, key=lambda m: m.name)
        ])
        return
    if not snapshot.models:
        typer.echo("no models deployed; try `gantry deploy ops/demo/llama-3.1-8b.yaml`")
        return
    console().print(models_table(snapshot))


def without_deleted(snapshot: ClusterSnapshot) -> ClusterSnapshot:
    """The snapshot without models that were deleted: nothing desired and no replica left."""
    live = {i.model for i in snapshot.instances}
    kept = tuple(m for m in snapshot.models if m.desired > 0 or m.name in live)
    return dataclasses.replace(snapshot, models=kept)


def _instance_row(inst: Instance) -> dict[str, Any]:
    return {
        "id": inst.id, "model": inst.model, "state": inst.state.value, "worker": inst.worker,
        "gpus": list(inst.gpu_indexes), "vram_claims": list(inst.vram_claims), "reason": inst.reason,
        "subordinates": inst.subordinates,
    }


def instances(
    model: Annotated[str | None, typer.Option("--model", "-m", help="only this model's instances")] = None,
    json_out: JsonFlag = False,
    nats_url: NatsUrl = None,
    redis_url: RedisUrl = None,
) -> None:
    """Instances (replicas): state, worker, GPUs and VRAM claims, and the reason when pending."""
    if model is not None:
        model_name(model)
    snapshot = run(lambda: _snapshot(load(nats_url, redis_url), model))
    rows = sorted(snapshot.instances, key=lambda i: (i.model, i.id))
    if json_out:
        print_json([_instance_row(i) for i in rows])
        return
    if not rows:
        typer.echo("no instances")
        return
    from rich.table import Table

    table = Table()
    for column in ("ID", "MODEL", "STATE", "WORKER", "GPUS", "VRAM/GPU GiB", "REASON"):
        table.add_column(column, no_wrap=column != "REASON")
    for inst in rows:
        claims = ",".join(gib(c) for c in inst.vram_claims) or "-"
        where = inst.worker or "-"
        if inst.subordinates:
            where += " +" + ",".join(s.worker for s in inst.subordinates)
        table.add_row(
            inst.id, inst.model, inst.state.value, where,
            ",".join(str(g) for g in inst.gpu_indexes) or "-", claims, inst.reason or "",
        )
    console().print(table)


def workers(
    ctx: typer.Context, json_out: JsonFlag = False, nats_url: NatsUrl = None, redis_url: RedisUrl = None
) -> None:
    """Workers and their GPUs: used / claimed / free VRAM per GPU, state and labels (`remove` forgets one)."""
    if ctx.invoked_subcommand is not None:
        return
    snapshot = run(lambda: _snapshot(load(nats_url, redis_url)))
    usage = gpu_usage(snapshot)
    if json_out:
        print_json([
            {
                "name": w.name, "state": snapshot.worker_states[w.name].value, "cluster": w.cluster,
                "labels": w.labels, "cordoned": w.cordoned,
                "heartbeat_age_s": round(snapshot.taken_at - w.last_heartbeat, 3),
                "gpus": [u for u in usage if u.worker == w.name],
            }
            for w in sorted(snapshot.workers, key=lambda w: w.name)
        ])
        return
    if not snapshot.workers:
        typer.echo("no workers registered; start some with `gantry up --workers 4`")
        return
    from rich.table import Table

    table = Table()
    sizes = ("TOTAL", "USED", "CLAIMED", "FREE")
    for column in ("WORKER", "STATE", "LABELS", "GPU", "PRODUCT", *sizes, "MODELS"):
        table.add_column(column, no_wrap=True, justify="right" if column in sizes else "left")
    by_name = {w.name: w for w in snapshot.workers}
    last = ""
    for u in usage:
        worker = by_name[u.worker]
        first = u.worker != last
        last = u.worker
        state = snapshot.worker_states[u.worker]
        labels = ",".join(f"{k}={v}" for k, v in sorted(worker.labels.items()))
        gpu = f"{u.index}" + ("" if u.schedulable else " (cordoned)")
        table.add_row(
            u.worker if first else "", state.value if first else "", labels if first else "",
            gpu, u.product, gib(u.total), gib(u.used), gib(u.claimed), gib(u.free), ",".join(u.models),
        )
    console().print(table)
    counts = Counter(s.value for s in snapshot.worker_states.values())
    typer.echo("VRAM in GiB; " + " ".join(f"{k}={v}" for k, v in sorted(counts.items())))


def explain(
    model: Annotated[str, typer.Argument(help="a deployed model's name", show_default=False)],
    json_out: JsonFlag = False,
    nats_url: NatsUrl = None,
    redis_url: RedisUrl = None,
) -> None:
    """Why a model's replicas are not all running: pending reasons and the scheduler's last verdict."""
    model_name(model)
    settings = load(nats_url, redis_url)

    async def go() -> tuple[ClusterSnapshot, UnschedulableEvent | None]:
        snapshot = await _snapshot(settings, model)
        nc = await connect_nats(settings)
        try:
            verdict = await last_unschedulable(nc, model)
        finally:
            await nc.close()
        return snapshot, verdict

    snapshot, verdict = run(go)
    insts = [i for i in snapshot.instances if i.model == model]
    desired = desired_of(snapshot, model)
    pending = [i for i in insts if i.state is InstanceState.PENDING]
    failed = [i for i in insts if i.state is InstanceState.ERROR]
    counts = state_counts(insts)
    if json_out:
        print_json({
            "model": model, "desired": desired, "instances": dict(counts),
            "pending": [{"id": i.id, "reason": i.reason} for i in pending],
            "failed": [{"id": i.id, "worker": i.worker, "reason": i.reason} for i in failed],
            "last_unschedulable": verdict,
        })
        return
    summary = " ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "no instances"
    typer.echo(f"{model}: desired {desired}; {summary}")
    ready = sum(1 for s in snapshot.worker_states.values() if s is WorkerState.READY)
    typer.echo(f"cluster: {ready}/{len(snapshot.workers)} workers READY")
    if failed:
        typer.echo(f"{len(failed)} replica(s) failed (not serving):")
        for inst in failed:
            typer.echo(f"  {inst.id} on {inst.worker}: {inst.reason or 'ERROR; replacement not planned yet'}")
    if not pending:
        running = counts["RUNNING"]
        typer.echo(f"nothing is pending: {running}/{desired} RUNNING" + ("" if running == desired else
                   " (the rest are being started or removed)"))
        return
    typer.echo(f"{len(pending)} replica(s) pending:")
    for _, why, ids in pending_groups(snapshot):
        shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
        typer.echo(f"  {shown}: {why}")
    if verdict is not None:
        typer.echo(f"latest verdict ({time.strftime('%H:%M:%S', time.gmtime(verdict.at))} UTC): {verdict.message}")
        for report in verdict.filters:
            typer.echo(f"  {report.filter}: kept {report.kept}/{report.total}")
            for reason in report.dropped[:5]:
                typer.echo(f"    {reason.subject or '(request)'}: {reason.message}")
            if len(report.dropped) > 5:
                typer.echo(f"    ... {len(report.dropped) - 5} more")
        for reason in verdict.reasons[:10]:
            typer.echo(f"  {reason.plugin} {reason.subject or '(request)'}: {reason.message}")


EXPLAIN_SCAN = 5000  # unschedulable events searched, newest first, for a model's latest verdict
EVENTS_SCAN = 100_000  # messages `events --last N` reads back at most to find N events


async def last_unschedulable(nc: NatsClient, model: str, scan: int = EXPLAIN_SCAN) -> UnschedulableEvent | None:
    """The newest UnschedulableEvent of ``model`` among the last ``scan`` such events in the stream."""
    import nats.js.errors

    from ops.events import decode_events
    from shared.bus.messages import UnschedulableEvent
    from shared.bus.streams import STREAM_EVENTS

    js = nc.jetstream()
    try:
        # the per-subject count comes with the same reply: no verdict stored means no consumer to create
        info = await js.stream_info(STREAM_EVENTS, subjects_filter=subjects.EVENT_UNSCHEDULABLE)
    except nats.js.errors.NotFoundError:
        return None
    last = info.state.last_seq
    if not info.state.messages or not (info.state.subjects or {}).get(subjects.EVENT_UNSCHEDULABLE):
        return None
    start = max(info.state.first_seq, last - scan + 1)
    found: UnschedulableEvent | None = None
    async for stored in _replay(js, subjects.EVENT_UNSCHEDULABLE, start, until=last, stream=STREAM_EVENTS):
        for event in decode_events(stored.subject, stored.data):
            if isinstance(event, UnschedulableEvent) and event.model == model:
                found = event
    return found


class Stored(NamedTuple):
    """One message read back from a stream: its subject, payload, sequence and the time the stream stored it."""

    subject: str
    data: bytes
    seq: int
    at: float


async def _replay(
    js: Any, subject: str, start: int, until: int | None, stream: str, idle: float = 0.5,
    on_ready: Callable[[], None] | None = None,
) -> AsyncIterator[Stored]:
    """Messages from ``start``; stops after ``until`` or, without it, never (``idle`` s per wait)."""
    from nats.js.api import ConsumerConfig, DeliverPolicy

    config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
    sub = await js.subscribe(subject, ordered_consumer=True, config=config, stream=stream)
    if on_ready is not None:
        on_ready()
    try:
        # A bounded read ends as soon as the consumer has nothing left that matches ``subject``: ``until`` is the
        # stream's last sequence over all subjects, which a filtered read may never reach (that cost one ``idle``).
        # Pushed messages already waiting in the client count as delivered, not pending: nothing matches only
        # when none is pending and none was delivered.
        if until is not None:
            info = await sub.consumer_info()
            if info.num_pending == 0 and not (info.delivered and info.delivered.consumer_seq):
                return
        while True:
            try:
                msg = await sub.next_msg(timeout=idle)
            except TimeoutError:
                if until is not None:
                    return
                continue
            meta = msg.metadata
            seq = meta.sequence.stream
            yield Stored(msg.subject, msg.data, seq, meta.timestamp.timestamp())
            if until is not None and (seq >= until or meta.num_pending == 0):
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


def events(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new events until Ctrl-C")] = False,
    last: Annotated[int, typer.Option(help="how many past events to show first (0: none)")] = 20,
    model: Annotated[str | None, typer.Option("--model", "-m", help="only this model's events")] = None,
    dead_letters: Annotated[
        bool, typer.Option("--dead-letters", help="show messages services rejected, with the reason")
    ] = False,
    json_out: JsonFlag = False,
    nats_url: NatsUrl = None,
    redis_url: RedisUrl = None,
) -> None:
    """Placement decisions, unschedulable verdicts, instance and cordon changes, each with its own time."""
    if model is not None:
        model_name(model)
    event_count(last)
    settings = load(nats_url, redis_url)

    async def go() -> None:
        from shared.bus.streams import STREAM_DLQ, STREAM_EVENTS

        stream, subject = (
            (STREAM_DLQ, subjects.DEAD_LETTER_ALL) if dead_letters else (STREAM_EVENTS, subjects.EVENTS_ALL)
        )
        nc = await connect_nats(settings)
        try:
            shown = await _print_events(nc, follow, last, model, json_out, stream, subject)
        finally:
            await nc.close()
        if not shown and not json_out and last:
            what = "dead letters: no message was rejected" if dead_letters else "events yet"
            typer.echo(f"no {what}" + (f" for {model}" if model else ""))

    with contextlib.suppress(typer.Exit):
        run(go)  # Ctrl-C ends --follow: that is how it is meant to stop


async def _print_events(
    nc: NatsClient, follow: bool, last: int, model: str | None, json_out: bool, stream: str, subject: str
) -> int:
    """Print the last ``last`` events (events, not messages: a batch message holds several), then follow."""
    import nats.js.errors

    from ops.events import decode_events, event_json, event_model, format_event

    js = nc.jetstream()
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        raise CliError("no event stream yet: the services create it when they start (`gantry up`)") from None
    first, end = info.state.first_seq, info.state.last_seq
    out = console()

    def show(stored: Stored, event: Any) -> None:
        if json_out:
            typer.echo(event_json(stored.subject, event, stored.at).decode())
        else:
            out.print(format_event(event, stored.at), markup=False, highlight=False)

    def matching(stored: Stored) -> list[Any]:
        return [e for e in decode_events(stored.subject, stored.data) if model is None or event_model(e) == model]

    history: list[tuple[Stored, Any]] = []
    window = last
    while last and info.state.messages and end >= first:
        start = max(first, end - window + 1)
        history = [
            (stored, e) async for stored in _replay(js, subject, start, until=end, stream=stream)
            for e in matching(stored)
        ]
        if len(history) >= last or start == first or window >= EVENTS_SCAN:
            break
        window = min(window * 4, EVENTS_SCAN)  # filtered or undecodable messages: read further back
    history = history[-last:] if last else []
    for stored, event in history:
        show(stored, event)
    if not follow:
        return len(history)

    def following() -> None:
        typer.echo("following events; Ctrl-C to stop", err=True)

    async for stored in _replay(js, subject, end + 1, until=None, stream=stream, on_ready=following):
        for event in matching(stored):
            show(stored, event)
    return len(history)
