"""``gantry top``: a live view of the cluster, redrawn from the state layer every interval."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.text import Text

from ops.cli.client import read_snapshot
from ops.cli.common import NatsUrl, RedisUrl, connect_redis, load, run
from ops.view import render_top
from shared.settings import Settings


def register(app: typer.Typer) -> None:
    """Add ``top``."""
    app.command("top")(top)


def top(
    interval: Annotated[float, typer.Option(min=0.1, help="seconds between redraws")] = 1.0,
    once: Annotated[bool, typer.Option("--once", help="print one frame and exit (for scripts)")] = False,
    nats_url: NatsUrl = None,
    redis_url: RedisUrl = None,
) -> None:
    """Live view: one row per worker, one cell per GPU (fullness, model), pending replicas and why."""
    settings = load(nats_url, redis_url)
    run(lambda: _top(settings, interval, once))


async def _top(settings: Settings, interval: float, once: bool) -> None:
    redis = await connect_redis(settings)
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=160)  # a capture or a pipe: do not squeeze 8 GPUs into 80
    try:
        if once:
            console.print(render_top(await read_snapshot(redis, settings)))
            return
        with Live(Text("reading cluster state ..."), console=console, auto_refresh=False, screen=False) as live:
            while True:
                try:
                    frame = render_top(await read_snapshot(redis, settings))
                except Exception as err:  # the stack went away: say so and keep trying
                    frame = Text(f"cannot read cluster state: {err}", style="red")
                live.update(frame, refresh=True)
                await asyncio.sleep(interval)
    finally:
        await redis.aclose()
