"""Issue 17's CLI frictions against the real demo stack: names users know, delete, status, events with their
own time and ``--last N`` events, the dead-letter view when there are none."""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path

import pexpect
import pyte
import pytest

from tests.integration.cli.conftest import GANTRY, Result, Stack, run_cli

pytestmark = pytest.mark.integration

Gantry = Callable[..., Result]


def spec_file(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(body)
    return path


@pytest.mark.parametrize("args", [["models"], ["events", "--last", "1"]], ids=["redis", "nats"])
def test_a_cli_without_the_stacks_credentials_is_told_so_not_that_the_stack_is_down(
    stack: Stack, tmp_path: Path, args: list[str]
) -> None:
    # another checkout, or GANTRY_HOME not set as for the `gantry up` that runs the stack: no secret for `cli`
    result = run_cli(args, {**stack.env, "GANTRY_HOME": str(tmp_path)})
    assert result.code == 1 and result.err.count("\n") == 1, result.err
    assert "refused identity 'cli'" in result.err and f"{tmp_path}/credentials.json, which does not exist" in result.err
    assert "is the stack running" not in result.err


def test_a_model_named_freely_is_placed_by_its_hugging_face_source(gantry: Gantry, tmp_path: Path) -> None:
    spec = spec_file(tmp_path, "chat", "name: my-chat\nsource: Qwen/Qwen3-8B\nreplicas: 1\n")
    deployed = gantry("deploy", str(spec), "--wait", "--timeout", "60")
    assert deployed.code == 0, deployed.err + deployed.out
    assert "my-chat: 1/1 RUNNING" in deployed.out
    assert gantry("delete", "my-chat").code == 0


def test_delete_stops_every_replica_and_drops_the_model_from_the_list(gantry: Gantry, tmp_path: Path) -> None:
    spec = spec_file(tmp_path, "gone", "name: gone-soon\nsource: Qwen/Qwen3-8B\nreplicas: 2\n")
    assert gantry("deploy", str(spec), "--wait", "--timeout", "60").code == 0
    deleted = gantry("delete", "gone-soon", "--timeout", "60")
    assert deleted.code == 0, deleted.err
    assert deleted.out.strip() == "deleted gone-soon"
    assert json.loads(gantry("instances", "--model", "gone-soon", "--json").out) == []
    assert "gone-soon" not in {m["name"] for m in json.loads(gantry("models", "--json").out)}
    assert "gone-soon" in {m["name"] for m in json.loads(gantry("models", "--all", "--json").out)}


def test_delete_of_an_unknown_model_is_one_line_and_exit_1(gantry: Gantry) -> None:
    result = gantry("delete", "never-deployed")
    assert result.code == 1
    assert result.err.startswith("error: unknown model 'never-deployed'") and result.err.count("\n") == 1


def test_status_reports_launcher_servers_workers_and_models(gantry: Gantry) -> None:
    result = gantry("status")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].startswith("gantry up: running (pid ")
    assert lines[1].startswith("processes: ") and "DOWN" not in lines[1]
    assert any(line.startswith("NATS: ") and line.endswith(" reachable") for line in lines)
    assert any(line.startswith("Redis: ") and line.endswith(" reachable") for line in lines)
    assert "workers: 4 (READY 4)" in lines
    assert any(line.startswith("models: ") and "RUNNING" in line for line in lines)


def test_status_json_has_the_launcher_servers_workers_and_models(gantry: Gantry) -> None:
    result = gantry("status", "--json")
    assert result.code == 0, result.err
    status = json.loads(result.out)
    assert status["launcher"]["running"] and status["launcher"]["processes"]["reconciler"] == "up"
    assert status["nats"]["reachable"] and status["redis"]["reachable"]
    assert status["workers"]["by_state"]["READY"] == status["workers"]["total"] == 4
    assert status["models"]["total"] >= 2 and status["models"]["replicas_by_state"]["RUNNING"] >= 3


def test_events_last_n_prints_n_events_of_the_model_asked_for(gantry: Gantry) -> None:
    result = gantry("events", "--last", "2", "--model", "llama-8b", "--json")
    assert result.code == 0, result.err
    lines = result.out.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        event = json.loads(line)["event"]
        assert event.get("model", event.get("instance", {}).get("model")) == "llama-8b"


def test_events_history_is_in_time_order_with_each_events_own_time(gantry: Gantry) -> None:
    result = gantry("events", "--last", "300", "--json")
    assert result.code == 0, result.err
    times = []
    for line in result.out.strip().splitlines():
        doc = json.loads(line)
        times.append(doc["event"].get("at") or doc["stored_at"])
    assert len(times) > 5
    # services stamp `at` when they decide, the stream when it stores: a second of skew at most, never the
    # minutes between the demo's deploy and this call that a receive time would show
    late = [(a, b) for a, b in itertools.pairwise(times) if b < a - 1.0]
    assert not late, f"history printed out of time order: {late[:3]}"
    model_events = [json.loads(line) for line in result.out.splitlines() if '"gantry.events.model"' in line]
    assert model_events and all(e["stored_at"] <= times[-1] for e in model_events)


def test_dead_letters_view_says_so_when_there_are_none(gantry: Gantry) -> None:
    result = gantry("events", "--dead-letters", "--model", "zz-none")
    assert result.code == 0, result.err
    assert result.out.strip() == "no dead letters: no message was rejected for zz-none"


def test_top_fits_an_80x24_terminal_and_draws_at_once(stack: Stack) -> None:
    child = pexpect.spawn(GANTRY, ["top", "--interval", "0.5"], env=stack.env, encoding="utf-8",
                          codec_errors="replace", dimensions=(24, 80), timeout=30)
    screen = pyte.Screen(80, 24)
    stream = pyte.Stream(screen)
    started = time.monotonic()
    first_drawn: float | None = None
    try:
        deadline = started + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(pexpect.TIMEOUT):
                stream.feed(child.read_nonblocking(65536, timeout=0.3))
            lines = [line.rstrip() for line in screen.display]
            if first_drawn is None and any(line.startswith("gantry top") for line in lines):
                first_drawn = time.monotonic() - started
            if all(any(line.startswith(f"w{i} ") and "READY" in line for line in lines) for i in range(4)) \
                    and any(line.startswith("model llama-70b") for line in lines):
                break
        else:
            raise AssertionError("top never drew the cluster:\n" + "\n".join(screen.display))
        assert lines[0].startswith("gantry top "), "\n".join(lines)  # nothing scrolled off the top
        assert any(line == "Ctrl-C to quit" for line in lines)
        assert first_drawn is not None and first_drawn < 10
    finally:
        child.sendintr()
        child.expect(pexpect.EOF, timeout=15)
        child.close()
