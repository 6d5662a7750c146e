"""Every cluster command against the real local stack that `gantry up --workers 4 --demo` started."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import nats
import pytest

from ops.auth import Credentials
from shared.bus import subjects
from shared.settings import CREDENTIALS_FILE
from tests.integration.cli.conftest import Result, Stack

pytestmark = pytest.mark.integration

Gantry = Callable[..., Result]


def write_spec(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(body)
    return path


def by_name(rows: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    return {str(row["name"]): row for row in rows}


def test_up_demo_reports_both_models_running(stack: Stack) -> None:
    out = stack.startup_output
    assert "stack is up: 4 worker(s) READY" in out
    assert "deployed llama-8b: 2 replica(s), spread" in out
    assert "deployed llama-70b: 1 replica(s), binpack" in out
    assert out.count("RUNNING ") >= 3


def test_up_demo_sends_a_chat_completion_through_the_gateway_and_says_where_it_went(stack: Stack) -> None:
    out = " ".join(stack.startup_output.split())  # the terminal may wrap long lines
    assert re.search(r"gateway: http://127\.0\.0\.1:\d+/v1 \(Envoy", out), out
    routed = re.search(r"a chat completion for llama-8b was routed to (llama-8b-\w+) \(127\.0\.0\.1:\d+\)", out)
    assert routed, out
    assert re.search(rf"llama-8b\s+{routed.group(1)}\s+RUNNING", out)  # a RUNNING instance of the demo


def test_models_json_shows_the_demo_models_running(gantry: Gantry) -> None:
    result = gantry("models", "--json")
    assert result.code == 0, result.err
    models = by_name(json.loads(result.out))
    assert models["llama-8b"]["desired"] == 2
    assert models["llama-8b"]["instances"] == {"RUNNING": 2}
    assert models["llama-70b"]["instances"] == {"RUNNING": 1}


def test_models_table_lists_each_model(gantry: Gantry) -> None:
    result = gantry("models")
    assert result.code == 0
    assert "llama-8b" in result.out and "llama-70b" in result.out and "DESIRED" in result.out


def test_instances_of_a_spread_model_sit_on_different_workers(gantry: Gantry) -> None:
    result = gantry("instances", "--model", "llama-8b", "--json")
    assert result.code == 0, result.err
    rows = json.loads(result.out)
    assert [r["state"] for r in rows] == ["RUNNING", "RUNNING"]
    assert len({r["worker"] for r in rows}) == 2


def test_instances_table_shows_the_tensor_parallel_gpus(gantry: Gantry) -> None:
    result = gantry("instances", "--model", "llama-70b")
    assert result.code == 0
    assert "0,1,2,3" in result.out and "RUNNING" in result.out


def test_workers_json_reports_used_claimed_and_free_vram_per_gpu(gantry: Gantry) -> None:
    result = gantry("workers", "--json")
    assert result.code == 0, result.err
    workers = by_name(json.loads(result.out))
    assert sorted(workers) == ["w0", "w1", "w2", "w3"]
    assert {w["state"] for w in workers.values()} == {"READY"}
    gpus = [g for w in workers.values() for g in w["gpus"]]  # type: ignore[attr-defined]
    assert len(gpus) == 32
    held = [g for g in gpus if g["models"]]
    assert sorted(m for g in held for m in g["models"]) == ["llama-70b"] * 4 + ["llama-8b"] * 2
    for gpu in held:
        assert gpu["claimed"] > 0 and gpu["free"] == gpu["total"] - max(gpu["used"], gpu["claimed"])


def test_workers_table_has_a_row_per_gpu(gantry: Gantry) -> None:
    result = gantry("workers")
    assert result.code == 0
    assert "CLAIMED" in result.out and "FREE" in result.out and "READY=4" in result.out


def test_deploy_then_scale_up_and_down_with_wait(gantry: Gantry, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "qwen", "name: qwen3-8b\nsource: Qwen/Qwen3-8B\nreplicas: 1\n")
    deployed = gantry("deploy", str(spec), "--wait", "--timeout", "60")
    assert deployed.code == 0, deployed.err
    assert "qwen3-8b: 1/1 RUNNING" in deployed.out
    up = gantry("scale", "qwen3-8b", "3", "--wait", "--timeout", "60")
    assert up.code == 0, up.err
    assert "qwen3-8b: 3/3 RUNNING" in up.out
    down = gantry("scale", "qwen3-8b", "0", "--wait", "--timeout", "60")
    assert down.code == 0, down.err
    assert json.loads(gantry("instances", "--model", "qwen3-8b", "--json").out) == []


def test_explain_gives_the_schedulers_reason_for_a_model_that_cannot_fit(gantry: Gantry, tmp_path: Path) -> None:
    spec = write_spec(
        tmp_path, "huge",
        "name: huge\nsource: meta-llama/Meta-Llama-3.1-405B\ncatalog_model: meta-llama-3.1-405b\nreplicas: 1\n",
    )
    assert gantry("deploy", str(spec)).code == 0
    waited = gantry("scale", "huge", "1", "--wait", "--timeout", "3")
    assert waited.code == 1
    assert "not settled" in waited.err and "gantry explain" in waited.err
    deadline = time.monotonic() + 30  # the verdict comes back through the pipeline: poll, bounded
    while True:
        as_json = json.loads(gantry("explain", "huge", "--json").out)
        has_reason = bool(as_json["pending"]) and bool(as_json["pending"][0]["reason"])
        if (as_json["last_unschedulable"] and has_reason) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert as_json["pending"][0]["reason"]
    assert as_json["last_unschedulable"]["model"] == "huge"
    result = gantry("explain", "huge")
    assert result.code == 0, result.err
    assert "1 replica(s) pending" in result.out
    reason = result.out.split("pending:")[1].strip()
    assert reason and "waiting for placement" not in reason
    assert "latest verdict" in result.out
    gantry("scale", "huge", "0")


def test_explain_a_fully_running_model_says_nothing_is_pending(gantry: Gantry) -> None:
    result = gantry("explain", "llama-8b")
    assert result.code == 0
    assert "nothing is pending: 2/2 RUNNING" in result.out


def test_cordon_and_uncordon_one_gpu(gantry: Gantry) -> None:
    def gpu7() -> dict[str, object]:
        workers = by_name(json.loads(gantry("workers", "--json").out))
        return next(g for g in workers["w3"]["gpus"] if g["index"] == 7)  # type: ignore[attr-defined]

    assert gantry("cordon", "w3:7").code == 0
    assert gpu7()["schedulable"] is False
    assert gantry("uncordon", "w3:7").code == 0
    assert gpu7()["schedulable"] is True


def test_cordon_a_worker_puts_it_in_maintenance(gantry: Gantry) -> None:
    result = gantry("cordon", "w3")
    assert result.code == 0 and "cordoned w3" in result.out
    assert by_name(json.loads(gantry("workers", "--json").out))["w3"]["state"] == "MAINTENANCE"
    assert gantry("uncordon", "w3").code == 0
    assert by_name(json.loads(gantry("workers", "--json").out))["w3"]["state"] == "READY"


def test_events_show_the_demo_placements(gantry: Gantry) -> None:
    result = gantry("events", "--last", "500", "--model", "llama-70b")
    assert result.code == 0, result.err
    assert "placed        llama-70b" in result.out
    assert "GPU 0,1,2,3" in result.out


def test_events_json_is_one_object_per_line(gantry: Gantry) -> None:
    result = gantry("events", "--last", "5", "--json")
    assert result.code == 0
    lines = result.out.strip().splitlines()
    assert lines and all(json.loads(line)["subject"].startswith("gantry.events.") for line in lines)


@pytest.mark.parametrize(
    "args",
    [["scale", "nope", "1"], ["explain", "nope"], ["instances", "--model", "nope"]],
    ids=["scale", "explain", "instances"],
)
def test_unknown_model_is_one_line_and_exit_1(gantry: Gantry, args: list[str]) -> None:
    result = gantry(*args)
    assert result.code == 1
    assert result.err.startswith("error: unknown model 'nope'")
    assert "llama-8b" in result.err  # names the models that do exist
    assert len(result.err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("target", "code", "message"),
    [("nope", 1, "unknown worker 'nope'"), ("w0:42", 1, "worker 'w0' has no GPU 42"),
     ("w0:x", 2, "expected WORKER or WORKER:GPU-INDEX")],
)
def test_cordon_bad_targets(gantry: Gantry, target: str, code: int, message: str) -> None:
    result = gantry("cordon", target)
    assert result.code == code
    assert result.err.startswith(f"error: {message}")


BAD_FILES = {
    "missing": (None, "cannot read"),
    "not-yaml": ("name: [unclosed\n", "not valid YAML"),
    "a-list": ("- name: x\n", "must be a mapping"),
    "wrong-type": ("name: x\nreplicas: two\n", "Expected `int`, got `str` - at `$.replicas`"),
    "typo": ("name: x\nreplica: 2\n", "unknown field(s) replica"),
    "negative": ("name: x\nreplicas: -1\n", "negative replicas"),
    "separator-in-name": ("name: llama:3\n", "invalid model name 'llama:3'"),
    "bad-enum": ("name: x\nbackend: tensorrt\n", "Invalid enum value 'tensorrt'"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_deploy_bad_file_exits_2_with_the_reason(gantry: Gantry, tmp_path: Path, case: str) -> None:
    body, message = BAD_FILES[case]
    path = tmp_path / f"{case}.yaml"
    if body is not None:
        path.write_text(body)
    result = gantry("deploy", str(path))
    assert result.code == 2
    assert message in result.err
    assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err


def test_scale_to_a_negative_count_is_refused_as_usage(gantry: Gantry) -> None:
    assert gantry("scale", "llama-8b", "--", "-1").code == 2


def test_events_dead_letters_show_what_a_service_rejected(stack: Stack, gantry: Gantry) -> None:
    async def send_garbage() -> None:
        admin = Credentials.load(stack.home / CREDENTIALS_FILE).url(stack.env["GANTRY_NATS_URL"], "admin")
        nc = await nats.connect(admin)
        await nc.jetstream().publish(subjects.SCALE, b"{not json", headers={"Nats-Msg-Id": uuid.uuid4().hex})
        await nc.close()

    asyncio.run(send_garbage())
    deadline = time.monotonic() + 20
    while True:
        result = gantry("events", "--dead-letters", "--last", "50")
        if f"rejected      by reconciler on {subjects.SCALE}" in result.out or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert result.code == 0, result.err
    assert f"rejected      by reconciler on {subjects.SCALE}" in result.out
