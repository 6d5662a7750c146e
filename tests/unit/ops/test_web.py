"""The web view's pages render a cluster snapshot without any server: GPU map, models, pending reasons, events."""

from __future__ import annotations

import re

import pytest

from ops.cli.web import render_content, render_page, state_json
from ops.view import ClusterSnapshot, ModelView
from shared.core.placement.domain import GIB, Gpu, Instance, InstanceState, Worker, WorkerState

T0 = 1_700_000_000.0


def h100(index: int, schedulable: bool = True) -> Gpu:
    return Gpu(index=index, product="H100-SXM-80GB", vram_total=80 * GIB, schedulable=schedulable)


def snap() -> ClusterSnapshot:
    workers = (
        Worker(name="w1", gpus=(h100(0), h100(1, schedulable=False)), last_heartbeat=T0),
        Worker(name="w2", gpus=(h100(0),), last_heartbeat=T0, cordoned=True),
    )
    instances = (
        Instance(id="a-1", model="small", state=InstanceState.RUNNING, worker="w1", gpu_indexes=(0,),
                 vram_claims=(72 * GIB,)),
        Instance(id="b-1", model="huge<x>", state=InstanceState.PENDING, reason="needs 500 GiB & more"),
        Instance(id="b-2", model="huge<x>", state=InstanceState.PENDING, reason="needs 500 GiB & more"),
    )
    return ClusterSnapshot(
        taken_at=T0, workers=workers, instances=instances,
        worker_states={"w1": WorkerState.READY, "w2": WorkerState.MAINTENANCE},
        models=(ModelView("small", 1), ModelView("huge<x>", 2)),
    )


def test_gpu_map_has_a_card_per_worker_and_a_cell_per_gpu_with_fullness_and_model() -> None:
    html = render_content(snap(), [])
    assert re.findall(r'data-worker="([^"]+)"', html) == ["w1", "w2"]
    assert len(re.findall(r'data-gpu="\d"', html)) == 3
    assert '<div class="fill high" style="width:90%">' in html
    assert '<div class="model" title="small">small</div>' in html


def test_cordoned_workers_and_gpus_are_marked() -> None:
    html = render_content(snap(), [])
    assert html.count('class="gpu cordoned"') == 2  # w1's GPU1 alone, and w2's only GPU (whole worker)
    assert '<span class="state MAINTENANCE">cordoned</span>' in html


def test_models_show_desired_running_pending_and_the_pending_reason_once_per_group() -> None:
    html = render_content(snap(), [])
    row = re.search(r'<tr data-model="small">(.*?)</tr>', html)
    assert row and re.findall(r'<td class="n">(\d+)</td>', row.group(1)) == ["1", "1", "0", "0", "0"]
    assert "<td>huge&lt;x&gt;</td><td class=n>2</td><td>needs 500 GiB &amp; more</td>" in html


def test_names_and_events_are_escaped() -> None:
    html = render_page(snap(), ["<script>alert(1)</script>"])
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html
    assert "huge<x>" not in html


def test_empty_cluster_says_so() -> None:
    html = render_content(ClusterSnapshot(taken_at=T0), [])
    assert "no workers have reported yet" in html and "no models deployed" in html and "no events yet" in html


def test_state_json_matches_the_page() -> None:
    state = state_json(snap(), ["e1"])
    assert [w["name"] for w in state["workers"]] == ["w1", "w2"] and state["workers"][1]["cordoned"]
    assert [g["schedulable"] for g in state["gpus"]] == [True, False, False]
    assert state["pending"] == [{"model": "huge<x>", "reason": "needs 500 GiB & more", "instances": ["b-1", "b-2"]}]
    assert state["models"][1] == {"name": "small", "desired": 1, "states": {"RUNNING": 1}}
    assert state["events"] == ["e1"]


def test_servers_away_give_a_one_line_503_not_a_traceback() -> None:
    from fastapi.testclient import TestClient

    from ops.cli.web import build_app
    from ops.servers import free_port
    from shared.settings import Settings

    closed = free_port()  # nothing listens there
    settings = Settings(nats_url=f"nats://127.0.0.1:{closed}", redis_url=f"redis://127.0.0.1:{closed}/0")
    with TestClient(build_app(settings), base_url="http://127.0.0.1") as client:
        for path in ("/", "/fragment"):
            resp = client.get(path)
            assert resp.status_code == 503
            assert resp.text.startswith('<p class="error" id="error">cluster state unavailable: ')
            assert "Traceback" not in resp.text
        api = client.get("/api/state")
        assert api.status_code == 503 and api.json()["error"].startswith("cluster state unavailable")


@pytest.mark.parametrize(("host", "code"), [("evil.example", 400), ("127.0.0.1:8470", 503), ("localhost", 503)])
def test_the_web_view_answers_only_a_loopback_name(host: str, code: int) -> None:
    # any Host was served: a page whose name an attacker points at 127.0.0.1 (DNS rebinding) read the cluster
    from fastapi.testclient import TestClient

    from ops.cli.web import build_app
    from ops.servers import free_port
    from shared.settings import Settings

    closed = free_port()
    settings = Settings(nats_url=f"nats://127.0.0.1:{closed}", redis_url=f"redis://127.0.0.1:{closed}/0")
    with TestClient(build_app(settings), base_url="http://127.0.0.1") as client:
        assert client.get("/api/state", headers={"host": host}).status_code == code  # (503: no servers here)
        assert client.get("/openapi.json").status_code == 404


async def test_the_event_reader_opens_a_new_connection_once_its_old_one_gave_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # opened once and never again: after a NATS restart every page said "connection closed" until relaunched
    from ops.cli import common, web
    from shared.settings import Settings

    class Closed:
        is_closed = True

    opened: list[object] = []

    class Fresh:
        is_closed = False

        def jetstream(self) -> object:
            raise RuntimeError("read on the new connection")

    async def connect(settings: object) -> Fresh:
        opened.append(settings)
        return Fresh()

    monkeypatch.setattr(common, "connect_nats", connect)
    reader = web.Reader(Settings())
    reader.nc = Closed()
    with pytest.raises(RuntimeError, match="new connection"):
        await reader.events()
    assert len(opened) == 1
