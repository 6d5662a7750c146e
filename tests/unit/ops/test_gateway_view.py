"""``gantry gateway``: rows built from the model servers' reports (load, KV usage, hit rate since start and
over the last frame); ``--watch`` to a pipe prints every frame, with ``--json`` one line each."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
import pytest
from rich.console import Console

import ops.cli.gateway as gw
from ops.cli.gateway import EndpointRow, rows_of, table_of
from shared.bus.messages import EngineMetrics
from shared.core.placement.domain import InstanceState
from shared.core.routing.pool_source import Placed


def report(iid: str, hits: int, queries: int, model: str = "m", ts: float = 100.0, running: int = 0,
           waiting: int = 0) -> EngineMetrics:
    return EngineMetrics(instance_id=iid, model=model, url=f"http://127.0.0.1:80{iid[-1]}", ts=ts,
                         num_requests_running=running, num_requests_waiting=waiting, kv_cache_usage_perc=0.25,
                         block_size=16, num_gpu_blocks=100, prefix_cache_hits=hits, prefix_cache_queries=queries,
                         prompt_tokens=queries, generation_tokens=7)


def test_what_a_server_dropped_for_its_routers_is_shown_per_endpoint() -> None:
    # the counts every pushed report carries: a router's prefix index drifts for a server that dropped KV events
    lossy = msgspec.structs.replace(report("e1", 9, 10), kv_events_dropped=42, kv_snapshot_requests_dropped=3)
    (r,) = rows_of({"e1": lossy}, {}, now=100.0)
    assert (r.kv_events_dropped, r.kv_snapshot_requests_dropped) == (42, 3)
    con = Console(width=250, color_system=None)
    with con.capture() as cap:
        con.print(table_of([r]))
    header, row = (line for line in cap.get().splitlines() if "KV ev lost" in line or "e1" in line)
    cells = dict(zip((c.strip() for c in header.split("┃")), (c.strip() for c in row.split("│")), strict=True))
    assert cells["KV ev lost"] == "42"


def test_hit_rate_since_start_and_over_the_last_frame() -> None:
    rows = rows_of({"e1": report("e1", 90, 100)}, {"e1": report("e1", 10, 50)}, now=100.5)
    (r,) = rows
    assert r.hit_rate == 0.9 and r.recent_hit_rate == 80 / 50
    assert r.address == "127.0.0.1:801" and abs(r.age_s - 0.5) < 1e-9


def test_an_endpoint_that_queried_nothing_shows_no_rate_rather_than_zero() -> None:
    (r,) = rows_of({"e1": report("e1", 0, 0)}, {}, now=100.0)
    assert r.hit_rate is None and r.recent_hit_rate is None


def test_a_restarted_server_has_no_recent_rate_instead_of_a_negative_one() -> None:
    (r,) = rows_of({"e1": report("e1", 5, 10)}, {"e1": report("e1", 50, 100)}, now=100.0)
    assert r.recent_hit_rate is None and r.hit_rate == 0.5


def test_rows_are_sorted_by_model_then_endpoint_and_report_age_is_never_negative() -> None:
    latest = {"e2": report("e2", 0, 0, model="b"), "e1": report("e1", 0, 0, model="b"),
              "e3": report("e3", 0, 0, model="a", ts=200.0)}
    assert [(r.model, r.instance) for r in rows_of(latest, {}, now=100.0)] == [("a", "e3"), ("b", "e1"), ("b", "e2")]
    assert all(r.age_s >= 0 for r in rows_of(latest, {}, now=100.0))


def test_table_shows_load_and_hit_rate_per_endpoint_and_says_when_nothing_reported() -> None:
    con = Console(width=200, record=True)
    con.print(table_of(rows_of({"e1": report("e1", 3, 4, running=2, waiting=1)}, {}, now=100.0)))
    text = con.export_text()
    assert "e1" in text and "75.0%" in text and "25%" in text
    con = Console(width=200, record=True)
    con.print(table_of([]))
    assert "no model server reported" in con.export_text()


def test_the_one_shot_table_is_printed_whole_however_narrow_the_output() -> None:
    from ops.cli.connect import console

    long_id = "llama-3.1-70b-instruct-0123456789ab00"
    table = table_of(rows_of({long_id: report(long_id, 4, 9, model="llama-3.1-70b-instruct")}, {}, now=100.0))
    out = console(fit=table)
    with out.capture() as captured:
        out.print(table)
    assert long_id in captured.get() and "44.4%" in captured.get() and "prompt tok" in captured.get()
    assert "…" not in captured.get()


PLACED = {"e1": Placed("m", InstanceState.RUNNING), "e2": Placed("m", InstanceState.DRAINING),
          "e4": Placed("other", InstanceState.RUNNING)}


def test_each_endpoint_shows_its_placement_state_and_whether_the_placement_pool_admits_it() -> None:
    latest = {iid: report(iid, 0, 0) for iid in ("e1", "e2", "e3", "e4")}
    rows = {r.instance: r for r in rows_of(latest, {}, now=100.0, placed=PLACED)}
    assert (rows["e1"].state, rows["e1"].routable, rows["e1"].refusal) == ("RUNNING", True, None)
    assert (rows["e2"].state, rows["e2"].routable, rows["e2"].refusal) == ("DRAINING", False, "instance is DRAINING")
    assert (rows["e3"].state, rows["e3"].routable) == ("unknown", False)  # placement never issued this id
    assert (rows["e4"].state, rows["e4"].routable) == ("RUNNING", False)  # placement's instance serves another model
    con = Console(width=250, record=True)
    con.print(table_of(list(rows.values())))
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in con.export_text().splitlines() if "│" in line]
    by_endpoint = {c[1]: c[3:5] for c in cells}
    assert by_endpoint["e1"] == ["RUNNING", "yes"] and by_endpoint["e2"] == ["DRAINING", "no"]


def test_without_placement_the_state_is_unknown_and_the_table_says_it_could_not_be_read() -> None:
    (r,) = rows_of({"e1": report("e1", 0, 0)}, {}, now=100.0, placed=None)
    assert (r.state, r.routable) == ("unknown", None)
    con = Console(width=250, record=True)
    con.print(table_of([r]))
    assert "placement could not be read" in con.export_text()


def _frames(rows: list[list[EndpointRow]]) -> Callable[..., Coroutine[Any, Any, object]]:
    """``_listen`` as a watch sees it: each frame's rows handed to ``show``, then the end (Ctrl-C, NATS gone)."""
    async def listen(nats_url: object, redis_url: object, window_s: float, frames: int,
                     show: Callable[[list[EndpointRow]], None] | None = None) -> object:
        assert show is not None and frames > len(rows)
        for frame in rows:
            show(frame)
        return None
    return listen


def test_watch_to_a_pipe_prints_every_frame_as_it_comes(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    first = rows_of({"e1": report("e1", 5, 10)}, {}, now=100.0)
    second = rows_of({"e1": report("e1", 90, 100)}, {"e1": report("e1", 5, 10)}, now=101.0)
    monkeypatch.setattr(gw, "_listen", _frames([first, second]))
    gw.gateway(watch=True, interval=1.0)
    frames = capsys.readouterr().out.split("gantry gateway at ")[1:]
    assert len(frames) == 2  # a live display would have printed one frame, on exit
    assert "50.0%" in frames[0] and "90.0%" in frames[1]


def test_watch_with_json_prints_one_json_line_per_frame(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    frame = rows_of({"e1": report("e1", 9, 10)}, {}, now=100.0)
    monkeypatch.setattr(gw, "_listen", _frames([frame, frame, []]))
    gw.gateway(watch=True, interval=1.0, as_json=True)
    frames = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [len(f["rows"]) for f in frames] == [1, 1, 0]  # an empty frame still says when it was
    assert all(isinstance(f["at"], float) for f in frames) and frames[0]["at"] <= frames[2]["at"]
    assert frames[0]["rows"][0]["instance"] == "e1" and frames[0]["rows"][0]["hit_rate"] == 0.9
