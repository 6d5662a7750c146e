"""Cluster commands: deploy, scale, models, instances, workers, explain, cordon, uncordon, events."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ops.cli import reads
from ops.cli.client import (
    deploy_files,
    gone,
    parse_target,
    read_snapshot,
    removal,
    require_model,
    require_worker,
    scale_command,
    send_cordon,
    send_remove_worker,
    send_scale,
    unknown_worker,
    wait_for,
)
from ops.cli.common import JsonFlag, NatsUrl, RedisUrl, connect_nats, connect_redis, console, load, run, seconds, whole
from ops.cli.errors import CliError, Interrupted
from ops.cli.inputs import event_count, model_name, replica_count, worker_name
from ops.cli.reads import Stored, replay
from ops.view import ClusterSnapshot, state_counts
from shared.bus import subjects

if TYPE_CHECKING:  # NATS and the bus messages (numpy) load only in the commands that use them (issue 17)
    from nats.aio.client import Client as NatsClient

    from shared.settings import Settings

Wait = Annotated[bool, typer.Option("--wait", help="wait until every replica is RUNNING")]
Timeout = Annotated[float, seconds(0, help="seconds --wait waits before giving up")]
# cordon, uncordon and workers remove always wait until the reconciler has applied the change
ApplyTimeout = Annotated[float, seconds(0, help="seconds to wait until the change is applied")]


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
    replicas: Annotated[int, whole(argument=True, help="desired replicas (0 removes all)", show_default=False)],
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
    timeout: ApplyTimeout = 10.0,
    nats_url: NatsUrl = None,
    redis_url: RedisUrl = None,
) -> None:
    """Stop placing new replicas on a worker, or on one GPU of it (running replicas stay)."""
    _cordon(target, True, timeout, load(nats_url, redis_url))


def uncordon(
    target: Annotated[str, typer.Argument(help="WORKER or WORKER:GPU-INDEX", show_default=False)],
    timeout: ApplyTimeout = 10.0,
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
    timeout: ApplyTimeout = 10.0,
    nats_url: NatsUrl = None,
    redis_url: RedisUrl = None,
) -> None:
    """Forget a worker that is no longer heard from; its replicas are replaced elsewhere. A live worker is
    refused: stop it first (it would register again)."""
    worker_name(name)
    settings = load(nats_url, redis_url)

    async def go() -> int:
        redis = await connect_redis(settings)
        try:
            snapshot = await read_snapshot(redis, settings)
            known = {w.name for w in snapshot.workers} | set(snapshot.invalid_workers)
            if name not in known:  # as cordon says it, with the workers there are
                raise CliError(unknown_worker(name, known))
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
                await wait_for(redis, settings, lambda s: gone(s, name), timeout)
            except TimeoutError:
                raise CliError(
                    f"sent, but {name} was not removed within {timeout:g}s: see `gantry events --dead-letters`"
                ) from None
            return len(step.forget)
        finally:
            await redis.aclose()

    count = run(go)
    typer.echo(f"removed {name}" + (f"; {count} replica record(s) on it are replaced elsewhere" if count else ""))


# -- reads (their bodies are in ops.cli.reads, which the fast path runs without typer) ----------------------


def models(
    show_all: Annotated[bool, typer.Option("--all", help="also list deleted models (0 desired, no replicas)")] = False,
    json_out: JsonFlag = False,
    nats_url: NatsUrl = None,
    redis_url: RedisUrl = None,
) -> None:
    """Deployed models: desired replicas and instances by state."""
    with _ctrl_c():
        reads.models(show_all, json_out, nats_url, redis_url)


def instances(
    model: Annotated[str | None, typer.Option("--model", "-m", help="only this model's instances")] = None,
    json_out: JsonFlag = False,
    nats_url: NatsUrl = None,
    redis_url: RedisUrl = None,
) -> None:
    """Instances (replicas): state, worker, GPUs and VRAM claims, and the reason when pending."""
    with _ctrl_c():
        reads.instances(model, json_out, nats_url, redis_url)


def workers(
    ctx: typer.Context, json_out: JsonFlag = False, nats_url: NatsUrl = None, redis_url: RedisUrl = None
) -> None:
    """Workers and their GPUs: used / claimed / free VRAM per GPU, state and labels (`remove` forgets one)."""
    if ctx.invoked_subcommand is not None:
        return
    with _ctrl_c():
        reads.workers(json_out, nats_url, redis_url)


def explain(
    model: Annotated[str, typer.Argument(help="a deployed model's name", show_default=False)],
    json_out: JsonFlag = False,
    nats_url: NatsUrl = None,
    redis_url: RedisUrl = None,
) -> None:
    """Why a model's replicas are not all running: pending reasons and the scheduler's last verdict."""
    with _ctrl_c():
        reads.explain(model, json_out, nats_url, redis_url)


@contextlib.contextmanager
def _ctrl_c() -> Iterator[None]:
    try:
        yield
    except Interrupted:
        raise typer.Exit(130) from None


EVENTS_SCAN = 100_000  # messages `events --last N` reads back at most to find N events


def events(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new events until Ctrl-C")] = False,
    last: Annotated[int, whole(help="how many past events to show first (0: none)")] = 20,
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

    if not follow:  # Ctrl-C during a replay interrupts it: a script must not read success (130)
        run(go)
        return
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
            (stored, e) async for stored in replay(js, subject, start, until=end, stream=stream)
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

    async for stored in replay(js, subject, end + 1, until=None, stream=stream, on_ready=following):
        for event in matching(stored):
            show(stored, event)
    return len(history)
