"""``gantry top``: a live view of the cluster, redrawn from the state layer every interval.

It draws at once ("connecting ...") and fits the terminal: the full grid when it is wide enough, compact
cells (one line per worker) and a cut to the terminal's height otherwise, e.g. 80×24 (issue 17). To a pipe or a
file it prints the full view once per interval, one frame under the other.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated

import typer

from ops.cli.common import NatsUrl, RedisUrl, connect_redis, load, redact, run, seconds

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from ops.view import ClusterSnapshot
    from shared.settings import Settings


def register(app: typer.Typer) -> None:
    """Add ``top``."""
    app.command("top")(top)


def top(
    interval: Annotated[float, seconds(0.1, 3600, help="seconds between redraws")] = 1.0,
    once: Annotated[bool, typer.Option("--once", help="print one frame and exit (for scripts)")] = False,
    nats_url: NatsUrl = None,
    redis_url: RedisUrl = None,
) -> None:
    """Live view: one row per worker, one cell per GPU (fullness, model), pending replicas and why."""
    settings = load(nats_url, redis_url)
    run(lambda: _top(settings, interval, once))


def frame(snapshot: ClusterSnapshot, console: Console) -> RenderableType:
    """One screen for this console: on a terminal, its size (compact cells and a cut to its height when the
    full grid does not fit); in a pipe or a capture, the full view."""
    from ops.view import render_top

    if not console.is_terminal:
        return render_top(snapshot)
    width, height = console.size
    return render_top(snapshot, width=width, height=height - 1)  # the cursor's line stays free


async def _top(settings: Settings, interval: float, once: bool) -> None:
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    from ops.cli.client import read_snapshot

    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=160)  # a capture or a pipe: do not squeeze 8 GPUs into 80
    if once:
        redis = await connect_redis(settings)
        try:
            console.print(frame(await read_snapshot(redis, settings), console))
        finally:
            await redis.aclose()
        return
    if not console.is_terminal:
        await _frames(settings, interval, console)
        return
    # draw first, then connect: the screen says what it waits for instead of staying blank
    waiting = Text(f"gantry top: connecting to {redact(settings.redis_url)} ...")
    with Live(waiting, console=console, auto_refresh=False, screen=False) as live:
        live.refresh()
        redis = await connect_redis(settings)
        try:
            while True:
                try:
                    shown = frame(await read_snapshot(redis, settings), console)
                except Exception as err:  # the stack went away: say so and keep trying
                    shown = Text(f"cannot read cluster state: {err}", style="red")
                live.update(shown, refresh=True)
                await asyncio.sleep(interval)
        finally:
            await redis.aclose()


async def _frames(settings: Settings, interval: float, console: Console) -> None:
    """To a pipe or a file, a frame after each interval, one under the other: a live display writes nothing
    there until it stops (`gantry top > top.log`, or `| tee`, stayed empty, and killed, ended empty)."""
    from rich.text import Text

    from ops.cli.client import read_snapshot

    redis = await connect_redis(settings)
    try:
        while True:
            try:
                shown = frame(await read_snapshot(redis, settings), console)
            except Exception as err:  # the stack went away: say so and keep trying, as on a terminal
                shown = Text(f"cannot read cluster state: {err}")
            console.print(shown)
            console.file.flush()
            await asyncio.sleep(interval)
    finally:
        await redis.aclose()
