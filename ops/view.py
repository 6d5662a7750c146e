"""What the operator sees: a cluster snapshot and pure functions that turn it into tables.

``ClusterSnapshot`` is built from the Redis state layer (see ``ops.cli.client``) but is plain data, so
``gantry top``, ``gantry workers`` and the tests render it without any server. Nothing here reads a
clock: the snapshot carries the time it was taken.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from ops.text import escaped
from shared.core.placement.domain import GIB, Instance, InstanceState, ModelSpec, Worker, WorkerState
from shared.core.placement.lifecycle import HOLDS_GPUS

if TYPE_CHECKING:  # rich loads where a table is drawn: `explain` and `--json` never pay for it (issue 17)
    from rich.console import Group, RenderableType
    from rich.table import Table
    from rich.text import Text

# What the ledger holds GPUs for (ERROR included: its claims stay until it is replaced).
HELD_STATES = HOLDS_GPUS


@dataclass(frozen=True)
class ModelView:
    """A deployed model: its spec and how many replicas the operator asked for."""

    name: str
    desired: int
    spec: ModelSpec | None = None


@dataclass(frozen=True)
class ClusterSnapshot:
    """Everything the views show, read at one moment ``taken_at`` (unix seconds)."""

    taken_at: float
    workers: tuple[Worker, ...] = ()
    worker_states: dict[str, WorkerState] = field(default_factory=dict)
    instances: tuple[Instance, ...] = ()
    models: tuple[ModelView, ...] = ()
    # stored worker records that break today's limits (no service's snapshot holds them): worker -> why
    invalid_workers: dict[str, str] = field(default_factory=dict)


class GpuUsage(msgspec.Struct, frozen=True, kw_only=True):
    """One GPU as the operator sees it: reported use, Gantry's claims, what is left, who holds it."""

    worker: str
    index: int
    product: str
    total: int
    used: int
    claimed: int
    free: int
    schedulable: bool
    models: tuple[str, ...]

    @property
    def fullness(self) -> float:
        """The larger of reported use and claims, as a fraction of the GPU (0..1)."""
        if self.total <= 0:
            return 0.0
        return min(1.0, max(self.used, self.claimed) / self.total)


INVALID_STATE = "INVALID_RECORD"
"""The state `gantry workers --json` gives a worker known only by a stored record that breaks today's limits."""


def invalid_lines(snapshot: ClusterSnapshot) -> list[str]:
    """One line per worker whose stored record no snapshot holds (it breaks today's limits), with why and the fix."""
    return [
        f"{name}: invalid stored record: {escaped(why)} (left out of placement; `gantry workers remove {name}` "
        "clears it)"
        for name, why in sorted(snapshot.invalid_workers.items())
    ]


def gpu_holders(instances: Iterable[Instance]) -> dict[tuple[str, int], list[tuple[str, int]]]:
    """(worker, gpu index) -> [(model, claimed bytes)] for every instance that holds GPUs."""
    held: dict[tuple[str, int], list[tuple[str, int]]] = defaultdict(list)
    for inst in instances:
        if inst.state not in HELD_STATES or inst.worker is None:
            continue
        for idx, claim in zip(inst.gpu_indexes, inst.vram_claims, strict=False):
            held[(inst.worker, idx)].append((inst.model, claim))
        for sub in inst.subordinates:
            for idx, claim in zip(sub.gpu_indexes, sub.vram_claims, strict=False):
                held[(sub.worker, idx)].append((inst.model, claim))
    return held


def gpu_usage(snapshot: ClusterSnapshot) -> list[GpuUsage]:
    """Per-GPU used / claimed / free VRAM and holders, workers and GPUs in name/index order.

    Free is what placement could still give: total minus the larger of the reported use and
    Gantry's claims (use by processes Gantry does not manage still takes room).
    """
    held = gpu_holders(snapshot.instances)
    rows: list[GpuUsage] = []
    for worker in sorted(snapshot.workers, key=lambda w: w.name):
        for gpu in sorted(worker.gpus, key=lambda g: g.index):
            holders = held.get((worker.name, gpu.index), [])
            claimed = sum(claim for _, claim in holders)
            rows.append(
                GpuUsage(
                    worker=worker.name,
                    index=gpu.index,
                    product=escaped(gpu.product),
                    total=gpu.vram_total,
                    used=gpu.vram_used,
                    claimed=claimed,
                    free=max(0, gpu.vram_total - max(gpu.vram_used, claimed)),
                    schedulable=gpu.schedulable and not worker.cordoned,
                    models=tuple(sorted({model for model, _ in holders})),
                )
            )
    return rows


def state_counts(instances: Iterable[Instance]) -> Counter[str]:
    """How many instances are in each state."""
    return Counter(inst.state.value for inst in instances)


def gib(size: int) -> str:
    """Bytes as GiB with one decimal."""
    return f"{size / GIB:.1f}"


def clock(ts: float) -> str:
    """A unix time as HH:MM:SS UTC."""
    return time.strftime("%H:%M:%S", time.gmtime(ts))


BAR_CELLS = 5
MODEL_CHARS = 10


def bar(fraction: float, cells: int = BAR_CELLS) -> Text:
    """A fullness bar: filled blocks coloured by how full, then empty blocks."""
    from rich.text import Text

    filled = round(fraction * cells)
    colour = "green" if fraction < 0.5 else "yellow" if fraction < 0.9 else "red"
    text = Text("█" * filled, style=colour)
    text.append("░" * (cells - filled), style="dim")
    return text


STATE_STYLE = {
    WorkerState.READY: "green",
    WorkerState.NOT_READY: "red",
    WorkerState.MAINTENANCE: "yellow",
}


def _gpu_cell(usage: GpuUsage) -> Text:
    cell = bar(usage.fullness)
    cell.append(f" {usage.fullness * 100:3.0f}%")
    if not usage.schedulable:
        cell.append("\ncordoned", style="yellow")
    label = ",".join(usage.models) if usage.models else "-"
    if len(label) > MODEL_CHARS:
        label = label[: MODEL_CHARS - 1] + "…"
    cell.append("\n" + label, style="cyan" if usage.models else "dim")
    return cell


def without_deleted(snapshot: ClusterSnapshot) -> ClusterSnapshot:
    """The snapshot without models that were deleted (nothing desired and no replica left): what every view lists,
    as `gantry models` does (its ``--all`` shows them; their specs stay recorded for a later deploy or scale)."""
    live = {i.model for i in snapshot.instances}
    kept = tuple(m for m in snapshot.models if m.desired > 0 or m.name in live)
    return snapshot if len(kept) == len(snapshot.models) else dataclasses.replace(snapshot, models=kept)


def summary_line(snapshot: ClusterSnapshot) -> Text:
    """One line: workers by state, GPUs, models, instances by state, time."""
    from rich.text import Text

    workers = Counter(state.value for state in snapshot.worker_states.values())
    gpus = sum(len(w.gpus) for w in snapshot.workers)
    products = sorted({escaped(g.product) for w in snapshot.workers for g in w.gpus if g.product})
    counts = state_counts(snapshot.instances)
    line = Text(f"gantry top  {clock(snapshot.taken_at)} UTC  ", style="bold")
    line.append(f"workers {len(snapshot.workers)} ({workers.get('READY', 0)} ready)  ")
    kinds = f" ({', '.join(products)})" if products else ""
    line.append(f"GPUs {gpus}{kinds}  models {len(snapshot.models)}  instances ")
    line.append(" ".join(f"{state}={n}" for state, n in sorted(counts.items())) or "none")
    _append_invalid(line, snapshot)
    return line


def _append_invalid(line: Text, snapshot: ClusterSnapshot) -> None:
    """The count of worker records left out of placement as invalid, in red, when there are any: they hold no
    GPU cell, so without it a fleet short of workers would look healthy."""
    if snapshot.invalid_workers:
        line.append(f"  invalid worker records {len(snapshot.invalid_workers)} (`gantry workers`)", style="bold red")


def workers_grid(snapshot: ClusterSnapshot) -> Table:
    """One row per worker (name and state), one cell per GPU (fullness bar, percentage, its model)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    usage = gpu_usage(snapshot)
    by_worker: dict[str, list[GpuUsage]] = defaultdict(list)
    for row in usage:
        by_worker[row.worker].append(row)
    width = max((len(w.gpus) for w in snapshot.workers), default=0)
    table = Table(show_lines=True, expand=False, box=box.SQUARE, padding=(0, 1))
    table.add_column("WORKER", no_wrap=True, min_width=9)
    for i in range(width):
        table.add_column(f"GPU{i}", no_wrap=True, min_width=MODEL_CHARS)
    for worker in sorted(snapshot.workers, key=lambda w: w.name):
        state = snapshot.worker_states.get(worker.name, WorkerState.NOT_READY)
        name = Text(worker.name, style="bold")
        name.append(f"\n{state.value}", style=STATE_STYLE.get(state, ""))
        cells: list[RenderableType] = [_gpu_cell(u) for u in by_worker[worker.name]]
        cells += [Text("")] * (width - len(cells))
        table.add_row(name, *cells)
    return table


def pending_groups(snapshot: ClusterSnapshot) -> list[tuple[str, str, list[str]]]:
    """(model, reason, instance ids) for PENDING replicas, grouped: many replicas share one reason."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for inst in sorted(snapshot.instances, key=lambda i: (i.model, i.id)):
        if inst.state is InstanceState.PENDING:
            groups[(inst.model, inst.reason or "waiting for placement")].append(inst.id)
    return [(model, reason, ids) for (model, reason), ids in sorted(groups.items())]


def pending_table(snapshot: ClusterSnapshot) -> Table:
    """Replicas that are not placed, per model and reason, with the latest reason the scheduler gave."""
    from rich.table import Table

    table = Table(title="pending replicas", title_justify="left", expand=False)
    table.add_column("MODEL", no_wrap=True)
    table.add_column("PENDING", justify="right", no_wrap=True)
    table.add_column("REASON")
    for model, reason, ids in pending_groups(snapshot):
        table.add_row(model, str(len(ids)), reason)
    return table


def models_table(snapshot: ClusterSnapshot) -> Table:
    """Per model: desired replicas and how many instances are in each state."""
    from rich.table import Table

    table = Table(title="models", title_justify="left", expand=False)
    for column in ("MODEL", "DESIRED", "RUNNING", "STARTING", "PENDING", "FAILED", "OTHER"):
        table.add_column(column, no_wrap=True, justify="left" if column == "MODEL" else "right")
    for model in sorted(snapshot.models, key=lambda m: m.name):
        counts = state_counts(i for i in snapshot.instances if i.model == model.name)
        starting = counts["SCHEDULED"] + counts["STARTING"]
        other = sum(counts.values()) - counts["RUNNING"] - starting - counts["PENDING"] - counts["ERROR"]
        table.add_row(
            model.name, str(model.desired), str(counts["RUNNING"]), str(starting),
            str(counts["PENDING"]), str(counts["ERROR"]), str(other),
        )
    return table


def render_top(snapshot: ClusterSnapshot, width: int = 160, height: int | None = None) -> RenderableType:
    """The whole `gantry top` screen for one snapshot: the full grid when ``width`` holds it, else compact
    cells (one line per worker), cut to ``height`` lines when given. Deleted models are not listed."""
    snapshot = without_deleted(snapshot)
    if width >= full_grid_width(snapshot):
        full = _full_top(snapshot)
        if height is None or _height(full, width) <= height:
            return full
    return compact_top(snapshot, width, height or 10_000)


def _height(renderable: RenderableType, width: int) -> int:
    """Lines ``renderable`` takes at ``width`` columns."""
    from rich.console import Console

    return len(Console(width=width, color_system=None).render_lines(renderable, pad=False))


def full_grid_width(snapshot: ClusterSnapshot) -> int:
    """Columns the full grid needs (worker column, then one cell per GPU, with borders)."""
    gpus = max((len(w.gpus) for w in snapshot.workers), default=0)
    return 12 + (MODEL_CHARS + 3) * gpus + 1


def _full_top(snapshot: ClusterSnapshot) -> RenderableType:
    from rich.console import Group
    from rich.text import Text

    parts: list[RenderableType] = [summary_line(snapshot)]
    parts.extend(Text(line, style="red") for line in invalid_lines(snapshot))
    if snapshot.workers:
        parts.append(workers_grid(snapshot))
    else:
        parts.append(Text("no workers have reported yet", style="yellow"))
    if snapshot.models:
        parts.append(models_table(snapshot))
    pending = pending_table(snapshot)
    if pending.row_count:
        parts.append(pending)
    else:
        parts.append(Text("no pending replicas", style="dim"))
    parts.append(Text("Ctrl-C to quit", style="dim"))
    return Group(*parts)


TAGS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
FULLNESS_GLYPHS = " ▁▂▃▄▅▆▇█"


def model_tags(snapshot: ClusterSnapshot) -> dict[str, str]:
    """A one-letter tag per model holding a GPU (``*`` past 26), in name order: the compact cells' legend."""
    names = sorted({m for u in gpu_usage(snapshot) for m in u.models})
    return {name: TAGS[i] if i < len(TAGS) else "*" for i, name in enumerate(names)}


def _compact_cell(usage: GpuUsage, tags: dict[str, str]) -> Text:
    """Three columns per GPU: the model's tag (``+`` when several share it, ``.`` when free), a fullness glyph,
    a space; yellow ``x`` replaces the tag on a cordoned GPU."""
    from rich.text import Text

    fullness = min(max(usage.fullness, 0.0), 1.0)
    colour = "green" if fullness < 0.5 else "yellow" if fullness < 0.9 else "red"
    if not usage.schedulable:
        tag, style = "x", "yellow"
    elif not usage.models:
        tag, style = ".", "dim"
    else:
        tag, style = (tags[usage.models[0]] if len(usage.models) == 1 else "+"), "cyan"
    cell = Text(tag, style=style)
    cell.append(FULLNESS_GLYPHS[round(fullness * (len(FULLNESS_GLYPHS) - 1))] or " ", style=colour)
    cell.append(" ")
    return cell


def _fit(line: Text, width: int) -> Text:
    line.truncate(width, overflow="ellipsis")
    return line


def compact_top(snapshot: ClusterSnapshot, width: int = 80, height: int = 24) -> Group:
    """`gantry top` for a small terminal: every line within ``width`` cells, at most ``height`` lines. Workers
    are one line each (a tag and a fullness glyph per GPU, legend below), models one line each; when the
    screen is short, workers past the room left are summed up in one line, then pending reasons are cut."""
    from rich.console import Group
    from rich.text import Text

    usage = gpu_usage(snapshot)
    tags = model_tags(snapshot)
    by_worker: dict[str, list[GpuUsage]] = defaultdict(list)
    for row in usage:
        by_worker[row.worker].append(row)
    head = [_fit(compact_summary(snapshot), width)]
    if snapshot.invalid_workers:  # its own line: at the end of the summary a narrow screen would cut it off
        head.append(_fit(Text(f"invalid worker records {len(snapshot.invalid_workers)}: `gantry workers`",
                              style="bold red"), width))
    workers: list[Text] = []
    for w in sorted(snapshot.workers, key=lambda w: w.name):
        state = snapshot.worker_states.get(w.name, WorkerState.NOT_READY)
        line = Text(f"{w.name[:10]:<10} ", style="bold")
        line.append(f"{_STATE_SHORT.get(state, '?'):<6}", style=STATE_STYLE.get(state, ""))
        for u in by_worker[w.name]:
            line.append_text(_compact_cell(u, tags))
        workers.append(_fit(line, width))
    if not workers:
        workers = [Text("no workers have reported yet", style="yellow")]
    legend = "  ".join(f"{tag}={name}" for name, tag in tags.items())
    legend_line = _fit(Text(f"GPU cells: tag+fullness, .=free x=cordoned  {legend}", style="dim"), width)
    models = [_fit(Text(_model_line(snapshot, m)), width) for m in sorted(snapshot.models, key=lambda m: m.name)]
    pending = [
        _fit(Text(f"pending {model} x{len(ids)}: {reason}", style="yellow"), width)
        for model, reason, ids in pending_groups(snapshot)
    ] or [Text("no pending replicas", style="dim")]
    footer = Text("Ctrl-C to quit", style="dim")
    room = max(height - 2 - len(head), 3)  # less the summary (and invalid-record) lines, legend and footer
    models = _cut(models, max(1, room // 3), "model(s); `gantry models`", width)
    pending = _cut(pending, max(1, room // 4), "pending reason(s); `gantry explain MODEL`", width)
    workers = _cut(workers, max(1, room - len(models) - len(pending)), "worker(s); `gantry workers`", width)
    lines = [*head, *workers, legend_line, *models, *pending, footer]
    return Group(*lines[:height])


def _cut(lines: list[Text], room: int, what: str, width: int) -> list[Text]:
    """``lines`` if they fit in ``room``, else the first ``room - 1`` and a line counting the rest."""
    from rich.text import Text

    if len(lines) <= room:
        return lines
    kept = lines[: room - 1]
    return [*kept, _fit(Text(f"... {len(lines) - len(kept)} more {what}", style="dim"), width)]


_STATE_SHORT = {WorkerState.READY: "READY", WorkerState.NOT_READY: "DOWN", WorkerState.MAINTENANCE: "MAINT"}


def compact_summary(snapshot: ClusterSnapshot) -> Text:
    """The summary line, short: time, workers ready, GPUs, instances by state."""
    from rich.text import Text

    ready = sum(1 for s in snapshot.worker_states.values() if s is WorkerState.READY)
    gpus = sum(len(w.gpus) for w in snapshot.workers)
    counts = state_counts(snapshot.instances)
    line = Text(f"gantry top {clock(snapshot.taken_at)}  ", style="bold")
    line.append(f"workers {ready}/{len(snapshot.workers)} ready  GPUs {gpus}  ")
    line.append(" ".join(f"{state}={n}" for state, n in sorted(counts.items())) or "no instances")
    return line


def _model_line(snapshot: ClusterSnapshot, model: ModelView) -> str:
    counts = state_counts(i for i in snapshot.instances if i.model == model.name)
    parts = [f"{counts[k]} {k.lower()}" for k in ("RUNNING", "STARTING", "SCHEDULED", "PENDING", "ERROR") if counts[k]]
    return f"model {model.name}: desired {model.desired}; " + (", ".join(parts) or "no replicas")
