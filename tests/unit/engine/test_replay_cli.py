"""``gantry engine replay`` on the shipped scenarios, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ops.cli.main import app, main

SCENARIOS = Path(__file__).resolve().parents[3] / "docs" / "scenarios" / "engine"
KEYS = ["step", "scheduled", "preempted", "num_running", "num_waiting", "kv_blocks_used", "finished"]


def _replay(name: str) -> list[dict[str, object]]:
    res = CliRunner().invoke(app, ["engine", "replay", "--scenario", str(SCENARIOS / name)])
    assert res.exit_code == 0, res.output
    return [json.loads(line) for line in res.output.splitlines()]


@pytest.mark.parametrize("name", sorted(p.name for p in SCENARIOS.glob("0*.json")))
def test_every_shipped_scenario_replays_to_completion(name: str) -> None:
    steps = _replay(name)
    assert [list(s) for s in steps] == [KEYS] * len(steps)
    assert [s["step"] for s in steps] == list(range(len(steps)))
    spec = json.loads((SCENARIOS / name).read_text())
    finished = [rid for s in steps for rid in s["finished"]]  # type: ignore[attr-defined]
    assert sorted(finished) == sorted(r["id"] for r in spec["requests"])
    # counts are taken after scheduling: the last step still runs what it then finishes
    assert steps[-1]["num_waiting"] == 0
    assert steps[-1]["num_running"] == len(steps[-1]["finished"])  # type: ignore[arg-type]


def test_the_tiny_pool_scenario_preempts_the_last_running_request() -> None:
    steps = _replay("01_preemption_tiny_pool.json")
    assert steps[1]["preempted"] == ["r1"] and steps[1]["scheduled"] == [["r0", 1]]


def test_the_priority_scenario_preempts_the_less_important_earlier_request() -> None:
    steps = _replay("04_priority_preemption.json")
    assert steps[2]["preempted"] == ["low"] and steps[2]["scheduled"] == [["high", 1]]


def test_the_prefix_scenario_schedules_only_uncached_tokens() -> None:
    steps = _replay("03_shared_prefix_cache.json")
    assert steps[2]["scheduled"][-1] == ["r1", 13]  # type: ignore[index]


def test_the_max_num_seqs_scenario_never_runs_more_than_three() -> None:
    assert max(int(s["num_running"]) for s in _replay("05_max_num_seqs_limit.json")) == 3  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{not json", "invalid scenario"),
        ('{"config": {}, "requests": [{"id": "a", "arrival_step": 0, "prompt_token_ids": [1], "max_tokens": "x"}]}',
         "max_tokens"),
        ('{"config": {"policy": "lifo"}, "requests": []}', "policy"),
        ('{"config": {"num_gpu_blocks": 3}, "requests": [{"id": "a", "arrival_step": 0, '
         '"prompt_token_ids": [1, 2, 3], "max_tokens": 40}]}', "blocks"),
        ('{"config": {}, "requests": [{"id": "a", "arrival_step": 0, "prompt_token_ids": [1], "max_tokens": 1},'
         '{"id": "a", "arrival_step": 1, "prompt_token_ids": [1], "max_tokens": 1}]}', "duplicate"),
        ('{"config": {"typo_field": 1}, "requests": []}', "typo_field"),
    ],
)
def test_invalid_scenarios_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, message: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(body)
    with pytest.raises(SystemExit) as exc:
        main(["engine", "replay", "--scenario", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_a_missing_scenario_file_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["engine", "replay", "--scenario", "/nonexistent/x.json"])
    assert exc.value.code == 2
