"""``gantry gateway``: the endpoints behind the gateway as its pickers see them, from the model servers' own
reports on NATS (``gantry.engine.metrics.<instance>``): load, KV-cache usage, prefix-cache hit rate and the
tokens each one served. Nothing is scraped; the view listens for one report interval per frame.

Engines report whether or not a picker routes to them, so each row also says what placement holds of the
endpoint's instance (its state, read from the state store as ``gantry instances`` reads it) and whether the
pool rule of a gateway that follows placement admits it (``shared.core.routing.pool_source``): a DRAINING
instance still reports while its last requests finish, but gets no new one.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Annotated

import msgspec
import nats.errors
import typer
from nats.aio.msg import Msg
from rich.live import Live
from rich.table import Table

from ops.cli.client import read_snapshot
from ops.cli.common import (
    JsonFlag,
    NatsUrl,
    RedisUrl,
    connect_nats,
    connect_redis,
    console,
    load,
    print_json,
    run,
    seconds,
)
from ops.cli.errors import CliError
from shared.bus import subjects
from shared.bus.messages import EngineMetrics
from shared.core.routing.pool_source import Placed, PoolSource, refusal
from shared.host.disconnect import close_promptly

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from shared.settings import Settings

UNKNOWN = "unknown"  # placement holds no such instance, or placement could not be read


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
    state: str  # placement's state of the instance (RUNNING, DRAINING, ...) or "unknown"
    routable: bool | None  # admitted by the placement pool rule (None: placement could not be read)
    refusal: str | None  # why not, when it is not
    # what its NATS publisher dropped since start: KV-event messages (the routers' prefix index drifts for it) and
    # prefix-cache snapshot requests (a router that asked rebuilt its view late)
    kv_events_dropped: int = 0
    kv_snapshot_requests_dropped: int = 0


def _rate(hits: float, queries: float) -> float | None:
    return hits / queries if queries > 0 else None


def rows_of(latest: dict[str, EngineMetrics], previous: dict[str, EngineMetrics], now: float,
            placed: Mapping[str, Placed] | None = None) -> list[EndpointRow]:
    """Rows sorted by model then instance; the recent hit rate against ``previous`` (the last frame); state and
    routability from ``placed`` (placement's instances by id; None when they could not be read)."""
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
                               m.prompt_tokens, m.generation_tokens, max(now - m.ts, 0.0),
                               *_placement_of(iid, m.model, placed), m.kv_events_dropped,
                               m.kv_snapshot_requests_dropped))
    return out


def _placement_of(iid: str, model: str, placed: Mapping[str, Placed] | None) -> tuple[str, bool | None, str | None]:
    """(state, routable, why not) of one endpoint under the pool rule of a gateway following placement."""
    if placed is None:
        return UNKNOWN, None, "placement not read"
    inst = placed.get(iid)
    why = refusal(PoolSource.PLACEMENT, iid, model, placed)
    return (UNKNOWN if inst is None else inst.state.value), why is None, why


def _yes_no(x: bool | None) -> str:
    return "?" if x is None else "yes" if x else "no"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def table_of(rows: list[EndpointRow]) -> Table:
    """The rows as a table, one line per endpoint."""
    t = Table(title="gateway endpoints (from the model servers' reports; hit = prefix-cache hit tokens / "
                    "prompt tokens, since start and over the last frame; pool = routable by a gateway following "
                    "placement)", title_justify="left")
    left = ("model", "endpoint", "address", "state", "pool")
    for col in (*left, "run", "wait", "KV", "hit", "hit now", "prompt tok", "gen tok", "KV ev lost", "age"):
        t.add_column(col, justify="left" if col in left else "right", no_wrap=True)
    for r in rows:
        t.add_row(r.model, r.instance, r.address, r.state, _yes_no(r.routable), str(r.running), str(r.waiting),
                  f"{r.kv_usage:.0%}",
                  _pct(r.hit_rate), _pct(r.recent_hit_rate), str(r.prompt_tokens), str(r.generation_tokens),
                  str(r.kv_events_dropped), f"{r.age_s * 1000:.0f} ms")
    if not rows:
        t.caption = "no model server reported: none runs, or they publish on another NATS"
    elif any(r.routable is None for r in rows):
        t.caption = "placement could not be read (no state store?): state and pool unknown"
    return t


Frame = tuple[dict[str, EngineMetrics], dict[str, EngineMetrics], "Mapping[str, Placed] | None"]


async def _connect_store(settings: Settings) -> aioredis.Redis | None:
    """The state store, or None when it cannot be reached (a gateway demo runs without placement)."""
    try:
        return await connect_redis(settings)
    except CliError:
        return None


async def _placed(redis: aioredis.Redis | None, settings: Settings) -> dict[str, Placed] | None:
    """Placement's instances by id, read as ``gantry instances`` reads them; None when they cannot be read."""
    if redis is None:
        return None
    try:
        snapshot = await read_snapshot(redis, settings)
    except Exception:  # an unreadable store leaves the column unknown, the reports still show
        return None
    return {i.id: Placed(i.model, i.state) for i in snapshot.instances}


WATCH_RECONNECT_S = 5.0
"""How long --watch tries to reach NATS again before it ends: a NATS restarted under it (`gantry up` restarts a
crashed one, on its port) is not the stack stopping (a watch ended at once, the NATS already back)."""


async def _listen(nats_url: str | None, redis_url: str | None, window_s: float, frames: int,
                  show: Callable[[list[EndpointRow]], None] | None = None) -> Frame:
    """Collect reports for ``frames`` windows; returns (latest, the frame before, placement's instances)."""
    settings = load(nats_url, redis_url)
    nc = await connect_nats(settings, reconnect_s=WATCH_RECONNECT_S if frames > 2 else 0.0)
    redis = await _connect_store(settings)
    latest: dict[str, EngineMetrics] = {}
    previous: dict[str, EngineMetrics] = {}
    placed: dict[str, Placed] | None = None
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
            if nc.is_closed:  # NATS went away and did not come back within WATCH_RECONNECT_S
                # the stack stopped: its last reports would be shown as if current, frame after frame, forever
                raise nats.errors.ConnectionClosedError
            placed = await _placed(redis, settings)
            if show is not None:
                show(rows_of(latest, previous, time.time(), placed))
    finally:
        await close_promptly(nc)  # a watch that only read: NATS gone must not hold the command for 10 s
        if redis is not None:
            await redis.aclose()
    return latest, previous, placed


async def one_frame(nats_url: str | None, redis_url: str | None, window_s: float) -> list[EndpointRow]:
    """The rows after listening for two windows (the recent hit rate needs a frame before)."""
    latest, previous, placed = await _listen(nats_url, redis_url, window_s, 2)
    return rows_of(latest, previous, time.time(), placed)


def gateway(
    watch: Annotated[bool, typer.Option("--watch", help="redraw every --interval until Ctrl-C (to a pipe: a table per "
                                        "frame; with --json: a JSON line per frame, {at, rows})")] = False,
    interval: Annotated[float, seconds(0.2, 60.0, help="seconds per frame")] = 1.0,
    as_json: JsonFlag = False,
    nats_url: NatsUrl = None,
    redis_url: RedisUrl = None,
) -> None:
    """Per endpoint: placement's state of its instance and whether a gateway following placement routes to it,
    running / waiting requests, KV usage, prefix-cache hit rate (since start and over the last frame) and
    tokens served, from the model servers' reports."""
    if not watch:
        rows = run(lambda: one_frame(nats_url, redis_url, interval))
        if as_json:
            print_json([asdict(r) for r in rows])
        else:
            table = table_of(rows)
            console(fit=table).print(table)
        return
    if as_json:
        run(lambda: _listen(nats_url, redis_url, interval, 1 << 30, _json_lines()))
    else:
        _watch(nats_url, redis_url, interval)


def _json_lines() -> Callable[[list[EndpointRow]], None]:
    """``--watch --json``: one line per frame, ``{"at": unix seconds, "rows": [...]}``, flushed, for a script or a
    log to follow (the time keeps an empty frame meaningful and a saved log in order)."""
    encode = msgspec.json.Encoder(order="sorted").encode

    def show(rows: list[EndpointRow]) -> None:
        frame = {"at": round(time.time(), 3), "rows": [asdict(r) for r in rows]}
        sys.stdout.write(encode(frame).decode() + "\n")
        sys.stdout.flush()

    return show


def _watch(nats_url: str | None, redis_url: str | None, interval: float) -> None:
    """Redraw the table in place on a terminal; to a pipe or a file, where a live display shows only its last frame
    and only on exit, print each frame under its time instead."""
    con = console()
    if con.is_terminal:
        with Live(table_of([]), console=con, refresh_per_second=4) as live:
            run(lambda: _listen(nats_url, redis_url, interval, 1 << 30, lambda rows: live.update(table_of(rows))))
        return

    def show(rows: list[EndpointRow]) -> None:
        table = table_of(rows)
        wide = console(fit=table)  # as a one-shot `gantry gateway` prints it: no cell cut short
        wide.print(f"gantry gateway at {time.strftime('%H:%M:%S')}")
        wide.print(table)
        wide.file.flush()

    run(lambda: _listen(nats_url, redis_url, interval, 1 << 30, show))

