"""``gantry status``: is the stack up, and in what shape (launcher, servers, services, workers, models)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from ops.cli.common import JsonFlag, NatsUrl, RedisUrl, connect_nats, connect_redis, load, print_json, redact, run

if TYPE_CHECKING:
    from ops.view import ClusterSnapshot
    from shared.settings import Settings


def register(app: typer.Typer) -> None:
    """Add ``status``."""
    app.command("status")(status)


def status(json_out: JsonFlag = False, nats_url: NatsUrl = None, redis_url: RedisUrl = None) -> None:
    """One screen on the stack: `gantry up` and its processes, NATS and Redis, workers and models.
    Exits 1 when NATS or Redis cannot be reached."""
    settings = load(nats_url, redis_url)
    launcher = launcher_state()
    if not json_out:
        for line in launcher_lines(launcher):
            typer.echo(line)
    snapshot = run(lambda: _reach(settings, say=not json_out))
    if json_out:
        print_json({
            "launcher": launcher, "nats": {"url": redact(settings.nats_url), "reachable": True},
            "redis": {"url": redact(settings.redis_url), "reachable": True}, **cluster_state(snapshot),
        })
        return
    for line in cluster_lines(snapshot):
        typer.echo(line)


def launcher_state() -> dict[str, Any]:
    """What the state file of this GANTRY_HOME says about `gantry up` (running, pid, home) and its child
    processes (name: up or down)."""
    from ops.stack import pid_alive, read_state, running_launcher
    from shared.paths import runtime_dir

    home = runtime_dir()
    pid = running_launcher(home)
    found: dict[str, Any] = {"running": pid is not None, "pid": pid, "home": str(home), "processes": {}}
    if pid is None:
        return found
    state = read_state(home) or {}
    for key in ("servers", "children"):
        group = state.get(key)
        if isinstance(group, dict):
            found["processes"].update(
                {name: "up" if isinstance(p, int) and pid_alive(p) else "down" for name, p in group.items()}
            )
    return found


def launcher_lines(launcher: dict[str, Any] | None = None) -> list[str]:
    """``launcher_state`` (read now when not given) in words."""
    launcher = launcher_state() if launcher is None else launcher
    home = launcher["home"]
    if not launcher["running"]:
        return [f"gantry up: not running from {home} (a stack elsewhere may still answer below)"]
    lines = [f"gantry up: running (pid {launcher['pid']}, home {home})"]
    if launcher["processes"]:
        marks = [f"{name} {'up' if up == 'up' else 'DOWN'}" for name, up in launcher["processes"].items()]
        lines.append("processes: " + ", ".join(marks))
    return lines


async def _reach(settings: Settings, say: bool = True) -> ClusterSnapshot:
    from ops.cli.client import read_snapshot

    nc = await connect_nats(settings)
    await nc.close()
    if say:
        typer.echo(f"NATS: {redact(settings.nats_url)} reachable")
    redis = await connect_redis(settings)
    try:
        if say:
            typer.echo(f"Redis: {redact(settings.redis_url)} reachable")
        return await read_snapshot(redis, settings)
    finally:
        await redis.aclose()


def cluster_state(snapshot: ClusterSnapshot) -> dict[str, Any]:
    """Workers by state, and the live models (deleted ones left out) with their replicas desired and by state."""
    from collections import Counter

    from ops.view import state_counts, without_deleted

    live = without_deleted(snapshot).models
    return {
        "workers": {"total": len(snapshot.workers),
                    "by_state": dict(sorted(Counter(s.value for s in snapshot.worker_states.values()).items())),
                    # records placement leaves out: they hold no GPU, so a fleet short of workers would look whole
                    "invalid_records": sorted(snapshot.invalid_workers)},
        "models": {"total": len(live), "desired": sum(m.desired for m in live),
                   "replicas_by_state": dict(sorted(state_counts(snapshot.instances).items()))},
    }


def cluster_lines(snapshot: ClusterSnapshot) -> list[str]:
    """Workers by state and models by replica state, one line each."""
    state = cluster_state(snapshot)
    workers, models = state["workers"], state["models"]
    if not workers["total"]:
        worker_line = "workers: none registered"
    else:
        counts = ", ".join(f"{k} {v}" for k, v in workers["by_state"].items())
        worker_line = f"workers: {workers['total']} ({counts})"
    if invalid := workers["invalid_records"]:
        worker_line += f"; {len(invalid)} invalid stored record(s), left out of placement (`gantry workers`)"
    if not models["total"]:
        return [worker_line, "models: none deployed"]
    shown = ", ".join(f"{k} {v}" for k, v in models["replicas_by_state"].items()) or "no replicas"
    return [worker_line, f"models: {models['total']}, {models['desired']} replica(s) desired; {shown}"]
