"""``gantry up`` and ``gantry down``: run the whole local stack in the foreground, stop it from elsewhere."""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from pathlib import Path
from typing import Annotated

import redis.asyncio as aioredis
import typer
from rich.console import Console
from rich.live import Live
from rich.text import Text

from ops.auth import CLI
from ops.cli.client import deploy_files, read_snapshot, wait_for
from ops.cli.common import NatsUrl as NatsUrlOpt
from ops.cli.common import RedisUrl, connect_redis, load, redact, seconds, whole
from ops.cli.errors import CliError
from ops.cli.inputs import worker_labels
from ops.cli.web import WebView
from ops.servers import ServerStartError
from ops.stack import (
    PLACEMENT_SERVICES,
    GatewayPorts,
    LocalStack,
    StackError,
    WorkerFleet,
    gpu_vram_gib,
    stop_running_stack,
)
from ops.view import ClusterSnapshot, models_table, state_counts, without_deleted
from shared.core.limits import MAX_EMULATED_WORKERS, MAX_GPUS_PER_WORKER
from shared.core.placement.domain import InstanceState, WorkerState
from shared.paths import REPO_ROOT, runtime_dir
from shared.settings import Settings

DEMO_DIR = REPO_ROOT / "ops" / "demo"
RESTART_LIMIT = 5  # restarts of one child before the stack gives up on it (like a crash loop)

MAX_EXIT_AFTER_S = 30 * 86_400.0  # `up --exit-after`: a month at most (a larger one, inf included, meant never)


def register(app: typer.Typer) -> None:
    """Add ``up`` and ``down``."""
    app.command("up")(up)
    app.command("down")(down)


def up(
    workers: Annotated[int, whole(0, MAX_EMULATED_WORKERS, help="emulated workers to start")] = 0,
    gpus: Annotated[int, whole(1, MAX_GPUS_PER_WORKER, help="GPUs per emulated worker")] = 8,
    gpu_type: Annotated[str, typer.Option(help="GPU product of the emulated workers")] = "H100-SXM-80GB",
    label: Annotated[
        list[str] | None, typer.Option(help="label KEY=VALUE for every emulated worker (repeatable)")
    ] = None,
    demo: Annotated[bool, typer.Option(help="deploy the example models in ops/demo and report")] = False,
    fresh: Annotated[bool, typer.Option(help="wipe the stack's stored data (.gantry/) first")] = False,
    tls: Annotated[bool, typer.Option(help="NATS over TLS (a CA and certificate generated into .gantry/tls/)")] = False,
    exit_after: Annotated[
        float | None, seconds(0, MAX_EXIT_AFTER_S, help="stop cleanly after this many seconds (scripts, trials)")
    ] = None,
    gateway: Annotated[
        bool, typer.Option(help="the gateway: Envoy and Gantry's picker in front of an emulated engine server per "
                                "RUNNING instance (--no-gateway: placement only)")
    ] = True,
    gateway_port: Annotated[
        int, whole(0, 65535, envvar="GANTRY_GATEWAY_PORT",
                   help="the gateway's OpenAI endpoint (Envoy's listener; 0: a free port)")
    ] = 8080,
    nats_url: NatsUrlOpt = None,
    redis_url: RedisUrl = None,
) -> None:
    """Start NATS, Redis, the four placement services, emulated workers and the gateway; Ctrl-C stops
    everything."""
    settings = load(nats_url, redis_url)
    if demo and workers == 0:
        raise CliError("--demo needs workers to place the demo models on: add --workers N", exit_code=2)
    labels = worker_labels(tuple(label or ()))
    if workers:
        try:
            gpu_vram_gib(gpu_type)  # refuse a bad fleet before anything starts
        except StackError as err:
            raise CliError(str(err), exit_code=2) from None
    home = runtime_dir()
    stack = LocalStack(settings, WorkerFleet(workers, gpus, gpu_type, labels, engines=gateway), home=home, tls=tls,
                       gateway=gateway, gateway_port=gateway_port)
    try:
        stack.preflight()  # the home's lock and free ports, before anything there is written or wiped
    except StackError as err:
        stack.stop()
        raise CliError(str(err)) from None
    if fresh:
        for sub in ("nats", "redis"):
            shutil.rmtree(home / sub, ignore_errors=True)
    out = Console(highlight=False)
    out.print(f"starting NATS at {redact(settings.nats_url)} and Redis, data and logs in {_rel(home)}/")
    signal.signal(signal.SIGTERM, _interrupt)  # `gantry down` and service managers stop us like Ctrl-C
    try:
        stack.start()
    except StackError as err:
        raise CliError(str(err)) from None
    except KeyboardInterrupt:
        out.print("stopped")
        raise typer.Exit(130) from None
    settings = stack.settings_for(CLI)  # credentials exist now (generated on the first `gantry up`)
    code = 0
    try:
        out.print(f"services: {', '.join(PLACEMENT_SERVICES)}; workers: {workers} × {gpus} {gpu_type}"
                  + (" (an engine server per RUNNING instance)" if gateway else ""))
        if stack.gateway_ports is not None:
            g = stack.gateway_ports
            picker = f"{_rel(g.picker)}/" if isinstance(g.picker, Path) else f":{g.picker}"
            admin = _rel(g.admin) if isinstance(g.admin, Path) else f":{g.admin}"
            out.print(f"gateway: {g.url}/v1 (Envoy, admin {admin}; picker on {picker}, pool = RUNNING "
                      f"instances)")
        asyncio.run(_foreground(stack, settings, out, workers, demo, exit_after))
    except KeyboardInterrupt:
        pass
    except CliError:
        code = 1
        raise
    finally:
        out.print("stopping the stack ...")
        stack.stop()
        out.print("stopped" if code == 0 else "stopped (after an error)")


def down(
    timeout: Annotated[float, seconds(0, help="seconds to wait for the stack to stop")] = 60.0,
) -> None:
    """Stop the stack a `gantry up` runs, in the foreground of another terminal or in the background."""
    home = runtime_dir()
    got = stop_running_stack(home, timeout)
    if got is None:
        raise CliError(f"no running stack found (nothing live recorded in {_rel(home)}/stack.json)")
    pid, stopped = got
    if not stopped:
        raise CliError(f"asked gantry up (pid {pid}) to stop; still running after {timeout:g}s")
    typer.echo(f"stopped gantry up (pid {pid})")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


async def _foreground(
    stack: LocalStack, settings: Settings, out: Console, workers: int, demo: bool, exit_after: float | None
) -> None:
    started = time.monotonic()
    redis = await connect_redis(settings, timeout=5)
    web: WebView | None = None
    try:
        try:
            ready = await wait_for(
                redis, settings, lambda s: _ready_workers(s) >= workers, timeout=30, check=lambda: _check(stack)
            )
        except TimeoutError:
            raise CliError(
                f"the {workers} emulated workers did not all become READY within 30 s; "
                f"see {_rel(stack.log_dir)}/workers.log and reconciler.log"
            ) from None
        out.print(f"stack is up: {_ready_workers(ready)} worker(s) READY")
        web = _start_web(settings, out)
        if demo:
            await _run_demo(stack, settings, redis, out)
        out.print("Ctrl-C (or `gantry down`) stops everything; try `gantry top` in another terminal"
                  + (" and `gantry gateway --watch`" if stack.gateway_ports is not None else ""))
        await _status_loop(stack, settings, redis, out, started, exit_after)
    finally:
        if web is not None:
            web.stop()
        await redis.aclose()


def _start_web(settings: Settings, out: Console) -> WebView | None:
    """The web view on GANTRY_WEB_PORT (0: none); a taken port is reported and the stack runs on."""
    if not settings.web_port:
        return None
    web = WebView(settings, settings.web_port)
    if not web.start():
        out.print(f"[yellow]web view not started: port {settings.web_port} is taken; set GANTRY_WEB_PORT[/]")
        return None
    out.print(f"web view: {web.url}")
    return web


def _ready_workers(snapshot: ClusterSnapshot) -> int:
    return sum(1 for state in snapshot.worker_states.values() if state is WorkerState.READY)


def _check(stack: LocalStack) -> None:
    """Fail the start-up if a server or service died: its log says why."""
    if not stack.servers_alive():
        raise CliError(f"a server exited; see {_rel(stack.home)}/nats/nats.log and redis/redis.log")
    for child in stack.dead_children():
        raise CliError(
            f"{child.name} exited with code {child.process.returncode} at start-up; see {_rel(child.log_path)}"
        )


async def _run_demo(stack: LocalStack, settings: Settings, redis: aioredis.Redis, out: Console) -> None:
    files = sorted(DEMO_DIR.glob("*.yaml"))
    specs = await deploy_files(settings, files)
    for spec in specs:
        out.print(f"deployed {spec.name}: {spec.replicas} replica(s), {spec.placement_strategy.value}")
    wanted = {spec.name: spec.replicas for spec in specs}

    def all_running(snapshot: ClusterSnapshot) -> bool:
        running = state_counts(
            i for i in snapshot.instances if i.model in wanted and i.state is InstanceState.RUNNING
        )
        return sum(running.values()) >= sum(wanted.values())

    try:
        snapshot = await wait_for(redis, settings, all_running, timeout=60, check=lambda: _check(stack))
    except TimeoutError:
        snapshot = await read_snapshot(redis, settings)
        out.print("[yellow]demo: not every replica is RUNNING after 60 s; see `gantry explain MODEL`[/]")
    out.print(models_table(without_deleted(snapshot)))
    for inst in sorted(snapshot.instances, key=lambda i: (i.model, i.id)):
        if inst.model in wanted:
            gpus = ",".join(str(g) for g in inst.gpu_indexes)
            where = f"{inst.worker} GPU {gpus}" if inst.worker else inst.reason or "not placed"
            out.print(f"  {inst.model:<16} {inst.id:<28} {inst.state.value:<9} {where}")
    if stack.gateway_ports is not None and specs:
        model = max(specs, key=lambda s: s.replicas).name
        running = {i.id for i in snapshot.instances if i.model == model and i.state is InstanceState.RUNNING}
        await asyncio.to_thread(_demo_chat, stack.gateway_ports, model, running, out)


def _demo_chat(ports: GatewayPorts, model: str, running: set[str], out: Console) -> None:
    """Send one streamed chat completion through the gateway and say where Envoy routed it (once the picker's
    pool holds the model's RUNNING replicas: each joins with its engine's first report)."""
    from ops.gateway_routing import chat_once, instances_by_address

    deadline = time.monotonic() + 10
    while not running <= set(instances_by_address(ports.eds).values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        routed = chat_once(ports.url, model, eds=ports.eds, timeout=30)
    except RuntimeError as err:
        out.print(f"[yellow]gateway: {err}[/]")
        return
    out.print(f"gateway: a chat completion for {model} was routed to {routed.instance} ({routed.address}); "
              f"the picker's choices: {routed.choices}")


async def _status_loop(
    stack: LocalStack, settings: Settings, redis: aioredis.Redis, out: Console, started: float,
    exit_after: float | None,
) -> None:
    restarts: dict[str, int] = {}
    with Live(Text("..."), console=out, refresh_per_second=2, transient=True) as live:
        last_plain = ""
        while exit_after is None or time.monotonic() - started < exit_after:
            await _restart_servers(stack, restarts, out)
            _restart_dead(stack, restarts, out)
            try:
                snapshot = await read_snapshot(redis, settings)
                line = status_line(stack, snapshot)
            except Exception as err:  # Redis hiccup: show it, keep the stack running
                line = Text(f"status unavailable: {err}", style="yellow")
            live.update(line)
            content = line.plain.split("  ", 1)[-1]  # without the clock
            if not out.is_terminal and content != last_plain:
                out.print(line)  # logs and pipes get a line per change instead of a redraw
                last_plain = content
            await asyncio.sleep(1.0)


def status_line(stack: LocalStack, snapshot: ClusterSnapshot) -> Text:
    """One line: servers, services alive, workers ready, instances by state."""
    alive = sum(1 for c in stack.children if c.alive())
    counts = state_counts(snapshot.instances)
    line = Text("● ", style="green" if alive == len(stack.children) else "red")
    line.append(f"{time.strftime('%H:%M:%S')}  processes {alive}/{len(stack.children)}  ")
    line.append(f"workers {_ready_workers(snapshot)}/{len(snapshot.workers)} ready  ")
    line.append(f"models {len(without_deleted(snapshot).models)}  instances ")
    line.append(" ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none")
    return line


async def _restart_servers(stack: LocalStack, restarts: dict[str, int], out: Console) -> None:
    """Start a crashed NATS or Redis again on its port and data, up to RESTART_LIMIT each: the services, workers
    and picker reconnect by themselves, but nothing works until the server is back."""
    for which, server in (("nats", stack.nats), ("redis", stack.redis)):
        if server is None or server.alive():
            continue
        key = f"server {which}"  # not a child's name: children are named after services and workers
        count = restarts.get(key, 0)
        if count > RESTART_LIMIT:
            continue  # given up on, and said so
        restarts[key] = count + 1
        if count == RESTART_LIMIT:
            out.print(f"[red]{which} keeps crashing; not restarting it. See {_rel(server.log_path)}[/]")
            continue
        out.print(f"[yellow]{which} exited with code {server.process.returncode}; restarting[/]")
        try:
            await asyncio.to_thread(stack.restart_server, which)
        except (ServerStartError, StackError) as err:  # e.g. its port taken meanwhile: tried again next second
            out.print(f"[red]{which} did not start again: {err}[/]")


def _restart_dead(stack: LocalStack, restarts: dict[str, int], out: Console) -> None:
    """Restart crashed children (compose's `restart: unless-stopped`), up to RESTART_LIMIT each."""
    for child in stack.dead_children():
        count = restarts.get(child.name, 0)
        stack.children.remove(child)
        if count >= RESTART_LIMIT:
            out.print(f"[red]{child.name} keeps crashing; not restarting it. See {_rel(child.log_path)}[/]")
            continue
        restarts[child.name] = count + 1
        out.print(f"[yellow]{child.name} exited with code {child.process.returncode}; restarting[/]")
        stack.spawn(child.name, child.argv)
        stack.write_state()


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
