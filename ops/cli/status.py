"""``gantry status``: is the stack up, and in what shape (launcher, servers, services, workers, models)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

from ops.cli.common import NatsUrl, RedisUrl, connect_nats, connect_redis, load, redact, run

if TYPE_CHECKING:
    from ops.view import ClusterSnapshot
    from shared.settings import Settings


def register(app: typer.Typer) -> None:
    """Add ``status``."""
    app.command("status")(status)


def status(nats_url: NatsUrl = None, redis_url: RedisUrl = None) -> None:
    """One screen on the stack: `gantry up` and its processes, NATS and Redis, workers and models.
    Exits 1 when NATS or Redis cannot be reached."""
    settings = load(nats_url, redis_url)
    for line in launcher_lines():
        typer.echo(line)
    snapshot = run(lambda: _reach(settings))
    for line in cluster_lines(snapshot):
        typer.echo(line)


def launcher_lines() -> list[str]:
    """What the state file of this GANTRY_HOME says about `gantry up` and its child processes."""
    from ops.stack import pid_alive, read_state, running_launcher
    from shared.paths import runtime_dir

    home = runtime_dir()
    pid = running_launcher(home)
    if pid is None:
        return [f"gantry up: not running from {home} (a stack elsewhere may still answer below)"]
    state = read_state(home) or {}
    lines = [f"gantry up: running (pid {pid}, home {home})"]
    procs: dict[str, object] = {}
    for key in ("servers", "children"):
        group = state.get(key)
        if isinstance(group, dict):
            procs.update(group)
    if procs:
        marks = [f"{name} {'up' if isinstance(p, int) and pid_alive(p) else 'DOWN'}" for name, p in procs.items()]
        lines.append("processes: " + ", ".join(marks))
    return lines


async def _reach(settings: Settings) -> ClusterSnapshot:
    from ops.cli.client import read_snapshot

    nc = await connect_nats(settings)
    await nc.close()
    typer.echo(f"NATS: {redact(settings.nats_url)} reachable")
    redis = await connect_redis(settings)
    try:
        typer.echo(f"Redis: {redact(settings.redis_url)} reachable")
        return await read_snapshot(redis, settings)
    finally:
        await redis.aclose()


def cluster_lines(snapshot: ClusterSnapshot) -> list[str]:
    """Workers by state and models by replica state, one line each."""
    from collections import Counter

    from ops.view import state_counts

    if not snapshot.workers:
        workers = "workers: none registered"
    else:
        counts = Counter(s.value for s in snapshot.worker_states.values())
        workers = f"workers: {len(snapshot.workers)} (" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ")"
    live = [m for m in snapshot.models if m.desired > 0 or any(i.model == m.name for i in snapshot.instances)]
    if not live:
        return [workers, "models: none deployed"]
    states = state_counts(snapshot.instances)
    desired = sum(m.desired for m in live)
    shown = ", ".join(f"{k} {v}" for k, v in sorted(states.items())) or "no replicas"
    return [workers, f"models: {len(live)}, {desired} replica(s) desired; {shown}"]

