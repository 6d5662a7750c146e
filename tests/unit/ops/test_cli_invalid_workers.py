"""`gantry workers` shows a worker whose stored record breaks today's limits (no snapshot holds it, so it would
otherwise vanish without a word) as "invalid stored record: <reason>", with the way to clear it; the operator's
removal is planned for it as for a silent worker. Read from the session's real Redis, as the command reads it.
`gantry top` and the web view count such records in their summaries and list them, so a fleet short of workers
does not look whole."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from rich.console import Console

from ops.cli import reads
from ops.cli.client import removal
from ops.cli.main import main
from ops.cli.status import cluster_lines, cluster_state
from ops.cli.web import render_content, state_json
from ops.servers import ServerProcess
from ops.view import ClusterSnapshot, compact_top, render_top, summary_line
from shared.core.placement.domain import GIB, Gpu, Worker
from shared.settings import Settings
from shared.state import StateStore

GOOD = Worker(name="w0", gpus=(Gpu(index=0, vram_total=80 * GIB),), ram_total=GIB)
PAST_LIMIT = b'{"name": "w9", "gpus": [{"index": 5000, "vram_total": 1}]}'  # GPU index past MAX_GPU_INDEX


@pytest.fixture
async def url(redis_server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    db_url = redis_server.url.rsplit("/", 1)[0] + "/10"
    store = StateStore.from_url(db_url)
    await store.r.flushdb()
    await store.register_workers([GOOD], 1.0)
    await store.r.hset("gantry:workers", "w9", PAST_LIMIT)  # written by an older build, or by hand
    await store.close()
    monkeypatch.setenv("GANTRY_REDIS_URL", db_url)  # a URL with a secret goes in the environment only
    yield db_url


def test_the_worker_listing_shows_an_invalid_stored_record_with_why_and_the_fix(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    reads.workers(False, None, None)
    out = capsys.readouterr().out
    [line] = [ln for ln in out.splitlines() if ln.startswith("w9")]
    assert line.startswith("w9: invalid stored record: ") and "$.gpus[0].index" in line
    assert "gantry workers remove w9" in line
    assert "w0" in out  # the good worker is listed as ever


def test_the_worker_listing_in_json_gives_an_invalid_stored_record_its_own_state(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    reads.workers(True, None, None)
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["w0"]["state"] == "NOT_READY"
    assert rows["w9"]["state"] == "INVALID_RECORD" and "$.gpus[0].index" in rows["w9"]["invalid_record"]


def test_removing_a_worker_known_only_by_an_invalid_record_is_planned() -> None:
    snapshot = ClusterSnapshot(taken_at=100.0, invalid_workers={"w9": "bad"})
    step = removal(snapshot, "w9", Settings())
    assert not isinstance(step, str) and step.worker == "w9"
    assert removal(ClusterSnapshot(taken_at=100.0), "w9", Settings()) == "unknown worker 'w9'"


def _with_invalid() -> ClusterSnapshot:
    return ClusterSnapshot(taken_at=100.0, workers=(GOOD,), invalid_workers={"w9": "$.gpus[0].index: too large"})


def test_top_counts_invalid_records_in_its_summary_and_lists_them_when_there_is_room() -> None:
    full = Console(width=200, color_system=None)
    with full.capture() as cap:
        full.print(render_top(_with_invalid()))
    out = cap.get()
    assert "invalid worker records 1" in out.splitlines()[0]
    assert "w9: invalid stored record: $.gpus[0].index: too large" in out and "gantry workers remove w9" in out
    small = Console(width=80, color_system=None)
    with small.capture() as cap:
        small.print(compact_top(_with_invalid(), 80, 24))
    assert "invalid worker records 1" in cap.get()


def test_the_web_view_lists_invalid_records_above_the_gpu_map_and_in_its_json() -> None:
    html = render_content(_with_invalid(), [])
    assert "invalid worker records 1" in html
    assert html.index('data-invalid-worker="w9"') < html.index("GPU map")
    assert state_json(_with_invalid(), [])["invalid_workers"] == [{"name": "w9", "why": "$.gpus[0].index: too large"}]


def test_views_of_a_fleet_without_invalid_records_do_not_mention_them() -> None:
    snapshot = ClusterSnapshot(taken_at=100.0, workers=(GOOD,))
    assert "invalid" not in render_content(snapshot, []) and state_json(snapshot, [])["invalid_workers"] == []
    assert "invalid" not in summary_line(snapshot).plain


def test_status_counts_invalid_records_beside_the_workers_and_lists_them_in_json() -> None:
    line, _ = cluster_lines(_with_invalid())
    assert line.endswith("; 1 invalid stored record(s), left out of placement (`gantry workers`)")
    assert cluster_state(_with_invalid())["workers"]["invalid_records"] == ["w9"]
    healthy = ClusterSnapshot(taken_at=100.0, workers=(GOOD,))
    assert "invalid" not in cluster_lines(healthy)[0] and cluster_state(healthy)["workers"]["invalid_records"] == []


MORE = (Worker(name="w8", gpus=tuple(Gpu(index=i, vram_total=80 * GIB) for i in range(8)), ram_total=GIB),
        Worker(name="w3", gpus=tuple(Gpu(index=i, vram_total=80 * GIB) for i in (0, 2, 5)), ram_total=GIB))


@pytest.mark.parametrize(("argv", "more", "says"), [
    # workers remove named none of the workers there are, as cordon does (the invalid record w9 may be removed)
    (["workers", "remove", "w7"], (), "unknown worker 'w7' (known: w0, w9)"),
    (["cordon", "w7"], (), "unknown worker 'w7' (known: w0)"),
    (["uncordon", "w7:0"], (), "unknown worker 'w7' (known: w0)"),
    # the GPUs it has, not only how many: "has no GPU 8 (it has 8)" left the valid indices to guess
    (["cordon", "w0:1"], (), "worker 'w0' has no GPU 1 (it has 1: 0)"),
    (["cordon", "w8:8"], MORE, "worker 'w8' has no GPU 8 (it has 8: 0..7)"),
    (["uncordon", "w3:1"], MORE, "worker 'w3' has no GPU 1 (it has 3: 0, 2, 5)"),
])
async def test_a_worker_or_gpu_that_is_not_there_is_refused_naming_those_that_are(
    url: str, argv: list[str], more: tuple[Worker, ...], says: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    if more:
        store = StateStore.from_url(url)
        await store.register_workers(list(more), 1.0)
        await store.close()
    monkeypatch.setenv("GANTRY_HOME", str(tmp_path))  # no credentials: the session's Redis takes none
    monkeypatch.setenv("GANTRY_NATS_URL", "nats://127.0.0.1:1")  # refused before NATS is needed
    code = await asyncio.to_thread(_gantry, argv)
    assert (code, capsys.readouterr().err) == (1, f"error: {says}\n")


def _gantry(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0
