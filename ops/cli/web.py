"""The web view `gantry up` serves: a GPU map per worker, models with their pending reasons, recent events.

Server-rendered HTML (no build step, no script needed to read it): ``/`` is the whole page, ``/fragment`` its
content, which a few lines of script fetch every two seconds to keep the page current; ``/api/state`` is the
same data as JSON. Everything is read as the CLI reads it (``ops.cli.client.read_snapshot``, the views of
``ops.view``, the event formatting of ``ops.events``); the rendering functions are pure (a snapshot and event
lines in, HTML out).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ops.view import (
    ClusterSnapshot,
    GpuUsage,
    clock,
    gib,
    gpu_usage,
    invalid_lines,
    pending_groups,
    state_counts,
)
from shared.core.placement.domain import WorkerState
from shared.settings import Settings

log = logging.getLogger("gantry.web")
EVENTS_SHOWN = 30
REFRESH_MS = 2000

STYLE = """
body{font-family:system-ui,sans-serif;margin:16px;background:#f6f7f9;color:#1d2330}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:18px 0 6px}
.summary{color:#444;margin-bottom:8px}
.workers{display:flex;flex-wrap:wrap;gap:10px}
.worker{background:#fff;border:1px solid #d5d9e0;border-radius:6px;padding:8px;min-width:260px}
.worker h3{font-size:14px;margin:0 0 6px} .state{font-size:12px;padding:1px 6px;border-radius:8px;margin-left:6px}
.READY{background:#d8f3dc} .NOT_READY{background:#f8d7da} .MAINTENANCE{background:#fff3cd}
.invalid{color:#a4161a;margin:4px 0}
.gpus{display:grid;grid-template-columns:repeat(4,1fr);gap:4px}
.gpu{border:1px solid #ccd;border-radius:4px;padding:3px;font-size:11px;background:#fafbfc}
.gpu.cordoned{border-color:#d39e00;background:#fff8e1}
.bar{height:8px;background:#e3e6eb;border-radius:3px;overflow:hidden;margin:2px 0}
.fill{height:100%} .low{background:#2a9d4b} .mid{background:#e0a800} .high{background:#d6333f}
.model{color:#1a5fb4;white-space:nowrap;overflow:hidden;text-overflow:ellipsis} .free{color:#999}
table{border-collapse:collapse;background:#fff} td,th{border:1px solid #d5d9e0;padding:3px 8px;font-size:13px}
th{background:#eef0f4;text-align:left} td.n{text-align:right} td:first-child{white-space:nowrap}
.error{color:#b00020;font-weight:bold}
.events{font-family:ui-monospace,monospace;font-size:12px;background:#fff;border:1px solid #d5d9e0;
padding:6px;white-space:pre;overflow-x:auto;margin:0}
"""

SCRIPT = f"""
async function refresh() {{
  const content = document.getElementById('content');
  try {{
    const r = await fetch('/fragment', {{cache: 'no-store'}});
    content.innerHTML = await r.text();  // a 503 says why the state cannot be read: never show stale data
  }} catch (e) {{
    content.innerHTML = '<p class="error" id="error">gantry up is not reachable (stopped?)</p>';
  }}
}}
setInterval(refresh, {REFRESH_MS});
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _gpu_cell(usage: GpuUsage) -> str:
    pct = usage.fullness * 100
    level = "low" if usage.fullness < 0.5 else "mid" if usage.fullness < 0.9 else "high"
    cordoned = not usage.schedulable
    models = "".join(f'<div class="model" title="{_e(m)}">{_e(m)}</div>' for m in usage.models)
    return (
        f'<div class="gpu{" cordoned" if cordoned else ""}" data-gpu="{usage.index}">'
        f"<b>GPU{usage.index}</b> {pct:.0f}%"
        f'<div class="bar"><div class="fill {level}" style="width:{pct:.0f}%"></div></div>'
        f"{gib(max(usage.used, usage.claimed))}/{gib(usage.total)} GiB"
        f"{models or '<div class=free>free</div>'}"
        f"{'<div>cordoned</div>' if cordoned else ''}</div>"
    )


def render_workers(snapshot: ClusterSnapshot) -> str:
    """One card per worker: its state, cordon, and a cell per GPU (fullness bar, memory, models)."""
    if not snapshot.workers:
        return "<p>no workers have reported yet</p>"
    by_worker: dict[str, list[GpuUsage]] = {}
    for usage in gpu_usage(snapshot):
        by_worker.setdefault(usage.worker, []).append(usage)
    cards = []
    for worker in sorted(snapshot.workers, key=lambda w: w.name):
        state = snapshot.worker_states.get(worker.name, WorkerState.NOT_READY).value
        cells = "".join(_gpu_cell(u) for u in by_worker.get(worker.name, []))
        cordon = ' <span class="state MAINTENANCE">cordoned</span>' if worker.cordoned else ""
        cards.append(
            f'<div class="worker" data-worker="{_e(worker.name)}"><h3>{_e(worker.name)}'
            f'<span class="state {_e(state)}">{_e(state)}</span>{cordon}</h3><div class="gpus">{cells}</div></div>'
        )
    return f'<div class="workers">{"".join(cards)}</div>'


def render_models(snapshot: ClusterSnapshot) -> str:
    """Per model: desired, running, starting, pending, failed replicas; then pending replicas by reason."""
    if not snapshot.models:
        return "<p>no models deployed</p>"
    rows = []
    for model in sorted(snapshot.models, key=lambda m: m.name):
        counts = state_counts(i for i in snapshot.instances if i.model == model.name)
        cells = (model.desired, counts["RUNNING"], counts["SCHEDULED"] + counts["STARTING"], counts["PENDING"],
                 counts["ERROR"])
        nums = "".join(f'<td class="n">{n}</td>' for n in cells)
        rows.append(f'<tr data-model="{_e(model.name)}"><td>{_e(model.name)}</td>{nums}</tr>')
    head = "".join(f"<th>{h}</th>" for h in ("model", "desired", "running", "starting", "pending", "failed"))
    out = f"<table><tr>{head}</tr>{''.join(rows)}</table>"
    groups = pending_groups(snapshot)
    if groups:
        reasons = "".join(
            f"<tr><td>{_e(model)}</td><td class=n>{len(ids)}</td><td>{_e(reason)}</td></tr>"
            for model, reason, ids in groups
        )
        head = "<tr><th>model</th><th>pending</th><th>reason</th></tr>"
        out += f"<h2>pending replicas</h2><table>{head}{reasons}</table>"
    return out


def render_content(snapshot: ClusterSnapshot, events: Sequence[str]) -> str:
    """The page's content (what ``/fragment`` returns and the page refreshes)."""
    counts = state_counts(snapshot.instances)
    ready = sum(1 for s in snapshot.worker_states.values() if s is WorkerState.READY)
    gpus = sum(len(w.gpus) for w in snapshot.workers)
    summary = (
        f"{clock(snapshot.taken_at)} UTC · workers {len(snapshot.workers)} ({ready} ready) · GPUs {gpus} · "
        f"models {len(snapshot.models)} · instances "
        + (" ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none")
        + (f" · invalid worker records {len(snapshot.invalid_workers)}" if snapshot.invalid_workers else "")
    )
    shown = "\n".join(_e(line) for line in events) or "no events yet"
    # a record placement leaves out holds no GPU card: listed above the map, or the fleet would look whole
    invalid = "".join(f'<p class="invalid" data-invalid-worker="{_e(name)}">{_e(line)}</p>'
                      for name, line in zip(sorted(snapshot.invalid_workers), invalid_lines(snapshot), strict=True))
    return (
        f'<div class="summary" id="summary">{_e(summary)}</div>{invalid}'
        f"<h2>GPU map</h2>{render_workers(snapshot)}"
        f"<h2>models</h2>{render_models(snapshot)}"
        f'<h2>recent events</h2><pre class="events" id="events">{shown}</pre>'
    )


def render_page(snapshot: ClusterSnapshot, events: Sequence[str]) -> str:
    """The whole page: content rendered now, refreshed in place every two seconds."""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Gantry</title>'
        f'<meta name="viewport" content="width=device-width"><style>{STYLE}</style></head>'
        f'<body><h1>Gantry</h1><div id="content">{render_content(snapshot, events)}</div>'
        f"<script>{SCRIPT}</script></body></html>"
    )


def state_json(snapshot: ClusterSnapshot, events: Sequence[str]) -> dict[str, Any]:
    """The same data as the page, for scripts: GPUs, models with state counts, pending reasons, events."""
    return {
        "taken_at": snapshot.taken_at,
        "workers": [
            {"name": w.name, "state": snapshot.worker_states.get(w.name, WorkerState.NOT_READY).value,
             "cordoned": w.cordoned}
            for w in sorted(snapshot.workers, key=lambda w: w.name)
        ],
        "invalid_workers": [{"name": name, "why": why} for name, why in sorted(snapshot.invalid_workers.items())],
        "gpus": [msgspec.to_builtins(u) for u in gpu_usage(snapshot)],
        "models": [
            {"name": m.name, "desired": m.desired,
             "states": dict(state_counts(i for i in snapshot.instances if i.model == m.name))}
            for m in sorted(snapshot.models, key=lambda m: m.name)
        ],
        "pending": [{"model": m, "reason": r, "instances": ids} for m, r, ids in pending_groups(snapshot)],
        "events": list(events),
    }


class Reader:
    """The connections the view reads through (opened on first use, in the server's event loop)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis: Any = None
        self.nc: Any = None

    async def snapshot(self) -> ClusterSnapshot:
        """The cluster as the CLI reads it, deleted models left out as `gantry models` leaves them out."""
        from ops.cli.client import read_snapshot
        from ops.cli.common import connect_redis
        from ops.view import without_deleted

        if self.redis is None:
            self.redis = await connect_redis(self.settings)
        return without_deleted(await read_snapshot(self.redis, self.settings))

    async def events(self, count: int = EVENTS_SHOWN) -> list[str]:
        """The newest ``count`` events of the event stream, newest first, formatted as `gantry events` does."""
        import nats.js.errors

        from ops.cli.common import connect_nats
        from ops.cli.reads import replay
        from ops.events import decode_events, format_event
        from shared.bus import subjects
        from shared.bus.streams import STREAM_EVENTS

        if self.nc is None or self.nc.is_closed:  # gave up reconnecting (NATS restarted): a fresh connection
            self.nc = await connect_nats(self.settings)
        js = self.nc.jetstream()
        try:
            info = await js.stream_info(STREAM_EVENTS)
        except nats.js.errors.NotFoundError:
            return []
        end = info.state.last_seq
        if not info.state.messages:
            return []
        lines: list[str] = []
        start = max(info.state.first_seq, end - count + 1)  # messages, each one event or a batch of them
        async for stored in replay(js, subjects.EVENTS_ALL, start, until=end, stream=STREAM_EVENTS, idle=0.3):
            lines += [format_event(ev, stored.at) for ev in decode_events(stored.subject, stored.data)]
        return lines[-count:][::-1]

    async def close(self) -> None:
        """Close whatever was opened."""
        if self.redis is not None:
            await self.redis.aclose()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]", "::1")


def build_app(settings: Settings) -> FastAPI:
    """The web view's application."""
    reader = Reader(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await reader.close()

    app = FastAPI(title="Gantry", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    # served on loopback, asked for by a loopback name only: a page elsewhere whose name an attacker points at
    # 127.0.0.1 (DNS rebinding) gets 400, not the cluster's state
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_NAMES))

    async def read() -> tuple[ClusterSnapshot, list[str]] | str:
        """The state, or one line saying why it cannot be read (servers away: the page says so, no traceback
        reaches the launcher's terminal)."""
        try:
            snapshot, events = await asyncio.gather(reader.snapshot(), reader.events())
        except Exception as err:
            return f"cluster state unavailable: {' '.join(str(err).split())[:200] or type(err).__name__}"
        return snapshot, events

    def unavailable(why: str) -> HTMLResponse:
        return HTMLResponse(f'<p class="error" id="error">{_e(why)}</p>', status_code=503)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        got = await read()
        return unavailable(got) if isinstance(got, str) else HTMLResponse(render_page(*got))

    @app.get("/fragment", response_class=HTMLResponse)
    async def fragment() -> HTMLResponse:
        got = await read()
        return unavailable(got) if isinstance(got, str) else HTMLResponse(render_content(*got))

    @app.get("/api/state")
    async def api_state() -> JSONResponse:
        got = await read()
        if isinstance(got, str):
            return JSONResponse({"error": got}, status_code=503)
        return JSONResponse(state_json(*got))

    return app


class WebView:
    """The web view served from a thread of its own (its own event loop; the launcher keeps its signals)."""

    def __init__(self, settings: Settings, port: int, host: str = "127.0.0.1") -> None:
        import uvicorn

        self.url = f"http://{host}:{port}/"
        config = uvicorn.Config(build_app(settings), host=host, port=port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="gantry-web", daemon=True)

    def start(self, timeout: float = 10.0) -> bool:
        """Start serving; False if it did not come up (a port taken: the stack runs on without it)."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        return bool(self.server.started)

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout=5)
