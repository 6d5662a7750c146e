"""``gantry gateway``: the endpoints behind the gateway as its pickers see them, from the model servers' own
reports on NATS (``gantry.engine.metrics.<instance>``): load, KV-cache usage, prefix-cache hit rate and the
tokens each one served. Nothing is scraped; the view listens for one report interval per frame.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Annotated

import msgspec
import typer
from nats.aio.msg import Msg
from rich.live import Live
from rich.table import Table

from ops.cli.common import JsonFlag, NatsUrl, connect_nats, console, load, print_json, run
from ops.cli.errors import CliError
from shared.bus import subjects
from shared.bus.messages import EngineMetrics


def register(app: typer.Typer) -> None:
    """Add ``gateway``."""
    app.command("gateway")(gateway)


@dataclass(frozen=True, slots=True)
class EndpointRow:
    """One model server as the view shows it."""

    instance: str
    model: str
    address: str
    running: int
    waiting: int
    kv_usage: float
    hit_rate: float | None  # hit tokens / queried tokens since the server started (None: nothing queried)
    recent_hit_rate: float | None  # the same over the last frame
    prompt_tokens: int
    generation_tokens: int
    age_s: float  # how old its latest report is


def _rate(hits: float, queries: float) -> float | None:
    return hits / queries if queries > 0 else None


def rows_of(latest: dict[str, EngineMetrics], previous: dict[str, EngineMetrics], now: float) -> list[EndpointRow]:
    """Rows sorted by model then instance; the recent hit rate against ``previous`` (the last frame)."""
    out = []
    for iid, m in sorted(latest.items(), key=lambda kv: (kv[1].model, kv[0])):
        old = previous.get(iid)
        recent = None
        if old is not None and m.prefix_cache_queries >= old.prefix_cache_queries:  # not restarted meanwhile
            recent = _rate(m.prefix_cache_hits - old.prefix_cache_hits,
                           m.prefix_cache_queries - old.prefix_cache_queries)
        out.append(EndpointRow(iid, m.model, m.url.split("://", 1)[-1], m.num_requests_running,
                               m.num_requests_waiting, m.kv_cache_usage_perc,
                               _rate(m.prefix_cache_hits, m.prefix_cache_queries), recent,
                               m.prompt_tokens, m.generation_tokens, max(now - m.ts, 0.0)))
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def table_of(rows: list[EndpointRow]) -> Table:
    """The rows as a table, one line per endpoint."""
    t = Table(title="gateway endpoints (from the model servers' reports; hit = prefix-cache hit tokens / "
                    "prompt tokens, since start and over the last frame)", title_justify="left")
    for col in ("model", "endpoint", "address", "run", "wait", "KV", "hit", "hit now", "prompt tok", "gen tok",
                "age"):
        t.add_column(col, justify="right" if col not in ("model", "endpoint", "address") else "left", no_wrap=True)
    for r in rows:
        t.add_row(r.model, r.instance, r.address, str(r.running), str(r.waiting), f"{r.kv_usage:.0%}",
                  _pct(r.hit_rate), _pct(r.recent_hit_rate), str(r.prompt_tokens), str(r.generation_tokens),
                  f"{r.age_s * 1000:.0f} ms")
    if not rows:
        t.caption = "no model server reported: none runs, or they publish on another NATS"
    return t


async def _listen(nats_url: str | None, window_s: float, frames: int,
                  show: Callable[[list[EndpointRow]], None] | None = None,
                  ) -> tuple[dict[str, EngineMetrics], dict[str, EngineMetrics]]:
    """Collect reports for ``frames`` windows; returns (latest, the frame before)."""
    nc = await connect_nats(load(nats_url))
    latest: dict[str, EngineMetrics] = {}
    previous: dict[str, EngineMetrics] = {}
    dec = msgspec.json.Decoder(EngineMetrics)

    async def on(msg: Msg) -> None:
        try:
            m = dec.decode(msg.data)
        except msgspec.DecodeError:
            return  # not ours to judge here: the pickers dead-letter malformed reports
        latest[m.instance_id] = m

    try:
        await nc.subscribe(subjects.ENGINE_METRICS_ALL, cb=on)
        for i in range(frames):
            if i:
                previous = dict(latest)
            await asyncio.sleep(window_s)
            if show is not None:
                show(rows_of(latest, previous, time.time()))
    finally:
        await nc.drain()
    return latest, previous


def gateway(
    watch: Annotated[bool, typer.Option("--watch", help="redraw every --interval until Ctrl-C")] = False,
    interval: Annotated[float, typer.Option(min=0.2, max=60.0, help="seconds per frame")] = 1.0,
    as_json: JsonFlag = False,
    nats_url: NatsUrl = None,
) -> None:
    """Per endpoint: running / waiting requests, KV usage, prefix-cache hit rate (since start and over the
    last frame) and tokens served, from the model servers' reports."""
    if watch and as_json:
        raise CliError("--watch and --json do not go together", exit_code=2)
    if not watch:
        latest, previous = run(lambda: _listen(nats_url, interval, 2))
        rows = rows_of(latest, previous, time.time())
        if as_json:
            print_json([asdict(r) for r in rows])
        else:
            console().print(table_of(rows))
        return
    con = console()
    with Live(table_of([]), console=con, refresh_per_second=4) as live:
        run(lambda: _listen(nats_url, interval, 1 << 30, lambda rows: live.update(table_of(rows))))

