"""The read commands (`gantry models`, `workers`, `instances`, `explain`) as plain functions, without typer.

``ops.cli.cluster`` registers them as typer commands; ``ops.cli.fast`` runs them straight from a simple command
line. Both call these same functions, so the output, the errors and the exit codes are the same either way
(issue 17: read commands within 0.5 s; typer, pydantic and redis-py with asyncio were two thirds of a call).
When Redis does not answer, the cluster is read twice (the blocking reader, then redis-py for the error): a
Redis that drops packets is reported after two connect timeouts, not one.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from ops.cli.client import desired_of, read_snapshot, require_model
from ops.cli.connect import (
    CONNECT_TIMEOUT_S,
    connect_nats,
    connect_redis,
    connection_settings,
    console,
    print_json,
    redis_unreachable,
    run_async,
)
from ops.cli.inputs import model_name
from ops.cli.output import echo
from ops.view import (
    INVALID_STATE,
    ClusterSnapshot,
    gib,
    gpu_usage,
    invalid_lines,
    models_table,
    pending_groups,
    state_counts,
    without_deleted,
)
from shared.bus import subjects
from shared.core.placement.domain import Instance, InstanceState, WorkerState

if TYPE_CHECKING:  # NATS and the bus messages load only in the commands that use them (issue 17)
    import redis.asyncio as aioredis
    from nats.aio.client import Client as NatsClient

    from ops.cli.connect import AnySettings
    from ops.cli.redis_reader import RedisReader
    from shared.bus.messages import UnschedulableEvent


def read_cluster(settings: AnySettings, model: str | None = None) -> ClusterSnapshot:
    """The snapshot the read commands show (of one model: a CliError if it is unknown), read over a blocking
    RedisReader when it can (no redis-py, no event loop: half of a call's work), else through redis-py, which
    then also gives the error when Redis cannot be read."""
    from ops.cli import redis_reader

    try:
        reader = redis_reader.RedisReader.connect(settings.redis_url, CONNECT_TIMEOUT_S, CONNECT_TIMEOUT_S + 3)
    except redis_reader.ReaderTimedOut as err:
        raise redis_unreachable(settings, err) from None  # (asked again through redis-py: twice the wait)
    except redis_reader.ReaderFailed:
        return run_async(lambda: _snapshot(settings, model))
    try:
        return redis_reader.run(_read(reader, settings, model))
    except redis_reader.ReaderTimedOut as err:
        raise redis_unreachable(settings, err) from None
    except redis_reader.ReaderFailed:
        pass  # read again below, through redis-py
    finally:
        reader.close()
    return run_async(lambda: _snapshot(settings, model))


async def _snapshot(settings: AnySettings, model: str | None = None) -> ClusterSnapshot:
    redis = await connect_redis(settings)
    try:
        return await _read(redis, settings, model)
    finally:
        await redis.aclose()


async def _read(redis: aioredis.Redis | RedisReader, settings: AnySettings, model: str | None) -> ClusterSnapshot:
    if model is not None:
        await require_model(redis, model)
    return await read_snapshot(redis, settings, model)


def models(show_all: bool, json_out: bool, nats_url: str | None, redis_url: str | None) -> None:
    """`gantry models`: deployed models, desired replicas and instances by state."""
    snapshot = read_cluster(connection_settings(nats_url, redis_url))
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
        echo(NO_MODELS)
        return
    console().print(models_table(snapshot))


NO_MODELS = "no models deployed; try `gantry deploy ops/demo/llama-8b.yaml`"  # a demo spec (from the repository)


def _instance_row(inst: Instance) -> dict[str, Any]:
    return {
        "id": inst.id, "model": inst.model, "state": inst.state.value, "worker": inst.worker,
        "gpus": list(inst.gpu_indexes), "vram_claims": list(inst.vram_claims), "reason": inst.reason,
        "subordinates": inst.subordinates,
    }


def instances(model: str | None, json_out: bool, nats_url: str | None, redis_url: str | None) -> None:
    """`gantry instances`: state, worker, GPUs and VRAM claims of each replica, and the reason when pending."""
    if model is not None:
        model_name(model)
    snapshot = read_cluster(connection_settings(nats_url, redis_url), model)
    rows = sorted(snapshot.instances, key=lambda i: (i.model, i.id))
    if json_out:
        print_json([_instance_row(i) for i in rows])
        return
    if not rows:
        echo("no instances")
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


def workers(json_out: bool, nats_url: str | None, redis_url: str | None) -> None:
    """`gantry workers`: workers and their GPUs, used / claimed / free VRAM per GPU, state and labels."""
    snapshot = read_cluster(connection_settings(nats_url, redis_url))
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
        ] + [
            {"name": name, "state": INVALID_STATE, "invalid_record": why}
            for name, why in sorted(snapshot.invalid_workers.items())
        ])
        return
    if not snapshot.workers and not snapshot.invalid_workers:
        echo("no workers registered; start some with `gantry up --workers 4`")
        return
    for line in invalid_lines(snapshot):
        echo(line)
    if not snapshot.workers:
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
    echo("VRAM in GiB; " + " ".join(f"{k}={v}" for k, v in sorted(counts.items())))


def explain(model: str, json_out: bool, nats_url: str | None, redis_url: str | None) -> None:
    """`gantry explain MODEL`: why a model's replicas are not all running, pending reasons and the last verdict."""
    model_name(model)
    settings = connection_settings(nats_url, redis_url)

    snapshot = read_cluster(settings, model)

    async def latest() -> UnschedulableEvent | None:
        nc = await connect_nats(settings)
        try:
            return await last_unschedulable(nc, model)
        finally:
            await nc.close()

    verdict = run_async(latest)
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
    echo(f"{model}: desired {desired}; {summary}")
    ready = sum(1 for s in snapshot.worker_states.values() if s is WorkerState.READY)
    echo(f"cluster: {ready}/{len(snapshot.workers)} workers READY")
    if failed:
        echo(f"{len(failed)} replica(s) failed (not serving):")
        for inst in failed:
            echo(f"  {inst.id} on {inst.worker}: {inst.reason or 'ERROR; replacement not planned yet'}")
    if not pending:
        running = counts["RUNNING"]
        echo(f"nothing is pending: {running}/{desired} RUNNING" + ("" if running == desired else
                   " (the rest are being started or removed)"))
        return
    echo(f"{len(pending)} replica(s) pending:")
    for _, why, ids in pending_groups(snapshot):
        shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
        echo(f"  {shown}: {why}")
    if verdict is not None:
        echo(f"latest verdict ({time.strftime('%H:%M:%S', time.gmtime(verdict.at))} UTC): {verdict.message}")
        for report in verdict.filters:
            echo(f"  {report.filter}: kept {report.kept}/{report.total}")
            for reason in report.dropped[:5]:
                echo(f"    {reason.subject or '(request)'}: {reason.message}")
            dropped = max(report.total - report.kept, len(report.dropped))  # a verdict carries the first reasons only
            if dropped > 5:
                echo(f"    ... {dropped - 5} more")
        for reason in verdict.reasons[:10]:
            echo(f"  {reason.plugin} {reason.subject or '(request)'}: {reason.message}")


EXPLAIN_SCAN = 5000  # unschedulable events searched, newest first, for a model's latest verdict


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
    async for stored in replay(js, subjects.EVENT_UNSCHEDULABLE, start, until=last, stream=STREAM_EVENTS):
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


async def replay(
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
