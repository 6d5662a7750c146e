"""`gantry workers` shows a worker whose stored record breaks today's limits (no snapshot holds it, so it would
otherwise vanish without a word) as "invalid stored record: <reason>", with the way to clear it; the operator's
removal is planned for it as for a silent worker. Read from the session's real Redis, as the command reads it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from ops.cli import reads
from ops.cli.client import removal
from ops.servers import ServerProcess
from ops.view import ClusterSnapshot
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
