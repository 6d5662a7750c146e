"""The CLI as a new user meets it (issue 17): one-line errors for every usage mistake, `--version`, YAML errors
that point at the line and column, a refusal at deploy for a model nothing can size, and read commands that
load nothing heavy before they run."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ops.cli.app import COMMANDS
from ops.cli.main import main
from ops.servers import free_port
from shared.paths import REPO_ROOT


@pytest.fixture(autouse=True)
def no_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ports nothing listens on: a command that got past its input checks fails with 1, not 2."""
    monkeypatch.setenv("GANTRY_NATS_URL", f"nats://127.0.0.1:{free_port()}")
    monkeypatch.setenv("GANTRY_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")


def gantry(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def one_line_refusal(args: tuple[str, ...], says: str) -> str:
    code, out, err = gantry(*args)
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert not any(box in err for box in "╭│╰"), err  # no usage box
    assert says in err, err
    return err


# A usage mistake of every kind, on the commands an operator types: huge, negative, malformed, unknown.
USAGE_MISTAKES = [
    (("scale", "llama-8b", "-1"), "replicas must be between 0 and"),
    (("scale", "llama-8b", "-99999999999999999999999"), "replicas must be between 0 and"),
    (("scale", "llama-8b", "99999999999999999999999"), "replicas must be between 0 and"),
    (("scale", "llama-8b", "two"), "Invalid value for 'replicas'"),
    (("scale", "llama-8b", "1.5"), "Invalid value for 'replicas'"),
    (("scale", "llama-8b"), "Missing argument"),
    (("scale", "llama-8b", "1", "--timeout", "-5"), "Invalid value for '--timeout'"),
    (("events", "--last", "-3"), "--last must be between 0 and"),
    (("events", "--last", "99999999999999999999"), "--last must be between 0 and"),
    (("events", "--last", "many"), "Invalid value for '--last'"),
    (("top", "--interval", "0"), "Invalid value for '--interval'"),
    (("top", "--interval", "nan-ish"), "Invalid value for '--interval'"),
    (("cordon", "w0:-1"), "expected WORKER or WORKER:GPU-INDEX"),
    (("cordon", "w0:99999999999"), "expected WORKER or WORKER:GPU-INDEX"),
    (("models", "--bogus"), "No such option: --bogus"),
    (("modles",), "No such command 'modles'"),
    (("explain",), "Missing argument"),
    (("delete", "a/b"), "invalid model name"),
    (("place", "--scenario", "x.json", "--replicas", "0"), "Invalid value for '--replicas'"),
    # refused before anything starts: a worker past the GPU limit never registers (its heartbeats are dead-lettered,
    # `up` gave up after 30 s), and a negative or NaN --exit-after started the whole stack only to stop it
    (("up", "--workers", "1", "--gpus", "129"), "Invalid value for '--gpus'"),
    (("up", "--workers", "100001"), "Invalid value for '--workers'"),  # one fleet process emulates at most 100,000
    (("up", "--exit-after", "-5"), "Invalid value for '--exit-after'"),
    (("up", "--exit-after", "nan"), "Invalid value for '--exit-after'"),
    (("up", "--workers", "1", *(arg for i in range(65) for arg in ("--label", f"k{i}=v"))), "at most 64 labels"),
    (("up", "--workers", "1", "--label", "zone=" + "a" * 1025), "at most 1024 characters each"),
    (("up", "--workers", "1", "--label", "zone"), "--label expects KEY=VALUE, got 'zone'"),
    (("up", "--workers", "1", "--label", "zone=a", "--label", "zone=b"), "--label 'zone' is given more than once"),
    # every duration has a bound above, named in the refusal: `--wait --timeout inf` (or 1e400) waited forever
    (("scale", "llama-8b", "1", "--wait", "--timeout", "inf"), "'--timeout': must be between 0 and 86400 seconds"),
    (("scale", "llama-8b", "1", "--wait", "--timeout", "1e400"), "'--timeout': must be between 0 and 86400 seconds"),
    (("deploy", "x.yaml", "--wait", "--timeout", "inf"), "'--timeout': must be between 0 and 86400 seconds"),
    (("delete", "llama-8b", "--timeout", "86401"), "'--timeout': must be between 0 and 86400 seconds"),
    (("cordon", "w0", "--timeout", "inf"), "'--timeout': must be between 0 and 86400 seconds"),
    (("uncordon", "w0", "--timeout", "inf"), "'--timeout': must be between 0 and 86400 seconds"),
    (("workers", "remove", "w0", "--timeout", "inf"), "'--timeout': must be between 0 and 86400 seconds"),
    (("down", "--timeout", "inf"), "'--timeout': must be between 0 and 86400 seconds"),
    (("up", "--exit-after", "inf"), "'--exit-after': must be between 0 and 2592000 seconds"),
    (("top", "--interval", "inf"), "'--interval': must be between 0.1 and 3600 seconds"),
    (("gateway", "--interval", "1e400"), "'--interval': must be between 0.2 and 60 seconds"),
    # NaN is not a number (it was refused as "should be greater than or equal to 0")
    (("scale", "llama-8b", "1", "--timeout", "nan"), "Invalid value for '--timeout': 'nan' is not a number"),
    (("down", "--timeout", "NaN"), "Invalid value for '--timeout': 'NaN' is not a number"),
    (("up", "--exit-after", "-nan"), "Invalid value for '--exit-after': '-nan' is not a number"),
    (("top", "--interval", "nan"), "Invalid value for '--interval': 'nan' is not a number"),
    # whole numbers in plain ASCII digits only: int() (and typer) read "1_0" as 10, "+5" and " 5" as 5
    *((("scale", "llama-8b", typed), "Invalid value for 'replicas': expected a whole number in plain digits (0-9)")
       for typed in ("1_0", "+5", " 5", "5 ", "\u0665", "\uff15", "0x10")),
    (("events", "--last", "2_0"), "Invalid value for '--last': expected a whole number in plain digits (0-9)"),
    (("up", "--workers", "1_0"), "Invalid value for '--workers': expected a whole number in plain digits (0-9)"),
    (("up", "--gpus", "+8"), "Invalid value for '--gpus': expected a whole number in plain digits (0-9)"),
    (("place", "--scenario", "x.json", "--replicas", "1_0"), "Invalid value for '--replicas': expected a whole"),
    (("simulate", "--replicas", "1_6"), "Invalid value for '--replicas': expected a whole number in plain digits"),
    (("engine", "random-scenario", "--seed", "1_0"), "Invalid value for '--seed': expected a whole number"),
    # the simulator's goodput SLOs are durations too: float() read "1_0" as 10 and "\uff12" (full width) as 2
    *((("simulate", opt, typed), f"Invalid value for '{opt}': expected a number of milliseconds, got")
      for opt in ("--slo-ttft-ms", "--slo-tpot-ms") for typed in ("1_0", "+5", " 5", "\uff12\uff10\uff10\uff10")),
    (("scale", "llama-8b", "9" * 5000), "Invalid value for 'replicas': too large a number (5000 digits)"),
    (("up", "--workers", "9" * 5000), "Invalid value for '--workers': must be between 0 and 100000, got '999"),
]


@pytest.mark.parametrize("args,says", USAGE_MISTAKES, ids=[" ".join(a)[:80] for a, _ in USAGE_MISTAKES])
def test_every_usage_mistake_is_one_line_with_exit_code_2(args: tuple[str, ...], says: str) -> None:
    one_line_refusal(args, says)


@pytest.mark.parametrize("args", [("scale", "llama-8b", "007"), ("scale", "llama-8b", "-0"), ("events", "--last", "0")])
def test_a_whole_number_in_plain_digits_passes_the_input_checks(args: tuple[str, ...]) -> None:
    code, _, err = gantry(*args)
    assert code == 1 and "cannot reach" in err, err  # past every input check: only the absent stack stops it


def test_a_usage_error_names_the_help_to_read() -> None:
    err = one_line_refusal(("scale", "llama-8b", "two"), "Invalid value")
    assert "(see `gantry scale --help`)" in err


@pytest.mark.parametrize("args", [("instances", "-m"), ("scale", "m", "1", "--timeout")])
def test_an_option_missing_its_value_names_the_commands_help(args: tuple[str, ...]) -> None:
    assert one_line_refusal(args, "requires an argument").endswith(f"(see `gantry {args[0]} --help`)\n")


@pytest.mark.parametrize("command", [("cordon",), ("uncordon",), ("workers", "remove")])
def test_a_commands_help_names_no_option_it_does_not_have(command: tuple[str, ...]) -> None:
    code, out, _ = gantry(*command, "--help")
    assert code == 0 and "--timeout" in out
    assert "--wait" not in out, out  # (its --timeout was described as "seconds --wait waits")


def test_errors_carry_no_internal_prefix() -> None:
    err = one_line_refusal(("scale", "llama-8b", "-1"), "replicas")
    assert "scale neg" not in err and "scale llama-8b:" not in err


def test_gantry_alone_prints_its_help_page_not_an_error_line() -> None:
    code, out, err = gantry()
    assert code == 2 and err == ""
    assert out.startswith("Usage: gantry") and "\nCommands:\n" in out


def test_a_command_group_alone_prints_its_help_page_not_an_empty_error() -> None:
    code, out, err = gantry("engine")
    assert code == 2 and err == ""
    assert "Usage: gantry engine" in out and "random-scenario" in out


def test_the_hint_for_a_cluster_without_models_names_a_spec_that_deploys() -> None:
    from ops.cli.client import load_spec
    from ops.cli.reads import NO_MODELS

    path = re.search(r"`gantry deploy (\S+)`", NO_MODELS)
    assert path is not None, NO_MODELS
    assert load_spec(REPO_ROOT / path.group(1)).replicas >= 1


def test_down_without_a_stack_names_the_home_it_looked_in(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GANTRY_HOME", str(tmp_path))
    code, _, err = gantry("down")
    assert code == 1 and err == f"error: no running stack found (nothing live recorded in {tmp_path}/stack.json)\n"


def test_version_prints_the_package_version() -> None:
    code, out, _ = gantry("--version")
    assert code == 0
    assert out.strip().startswith("gantry ") and out.strip().split()[1][0].isdigit()


def test_help_lists_every_command() -> None:
    code, out, _ = gantry("--help")
    assert code == 0
    listed = {line.split()[0] for line in out.split("Commands:")[1].splitlines() if line.strip()}
    assert listed == set(COMMANDS)


MALFORMED_YAML = [
    ("name: a\nreplicas: [1,\n", 3, 1),
    ("name: a\n  bad: : x\n", 2, 6),
    ("name: a\nsource: \"unterminated\n", 3, 1),
]


@pytest.mark.parametrize("text,line,column", MALFORMED_YAML)
def test_malformed_yaml_is_reported_with_line_and_column(tmp_path: Path, text: str, line: int, column: int) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    err = one_line_refusal(("deploy", str(spec)), "not valid YAML")
    assert f"bad.yaml:{line}:{column}:" in err and f"line {line}, column {column}" in err


def test_a_model_nothing_can_size_is_refused_at_deploy_with_the_fix(tmp_path: Path) -> None:
    spec = tmp_path / "mine.yaml"
    spec.write_text("name: my-model\nsource: acme/not-a-known-model\nreplicas: 1\n")
    err = one_line_refusal(("deploy", str(spec)), "model size unknown")
    assert "gantry catalog" in err and "weight_bytes" in err


def test_an_unknown_catalog_model_is_refused_at_deploy(tmp_path: Path) -> None:
    spec = tmp_path / "mine.yaml"
    spec.write_text("name: my-model\nsource: Qwen/Qwen3-8B\ncatalog_model: no-such-key\nreplicas: 1\n")
    one_line_refusal(("deploy", str(spec)), "catalog_model 'no-such-key' is not in the model catalogue")


@pytest.mark.parametrize("source", ["Qwen/Qwen3-8B", "meta-llama/Llama-3.1-8B-Instruct"])
def test_a_spec_named_freely_but_with_a_known_source_passes_deploys_checks(tmp_path: Path, source: str) -> None:
    spec = tmp_path / "mine.yaml"
    spec.write_text(f"name: my-chat\nsource: {source}\nreplicas: 1\n")
    code, _, err = gantry("deploy", str(spec))
    assert code == 1 and "cannot reach" in err, err  # past every input check: only the absent stack stops it


def test_catalog_lists_models_by_key_and_hf_id() -> None:
    code, out, _ = gantry("catalog", "--json")
    assert code == 0
    rows = json.loads(out)
    assert {"key": "qwen3-8b", "hf_model_id": "Qwen/Qwen3-8B"}.items() <= next(
        r for r in rows if r["key"] == "qwen3-8b"
    ).items()
    assert len(rows) >= 20


def test_catalog_filters_by_a_fragment() -> None:
    code, out, _ = gantry("catalog", "qwen3-8", "--json")
    assert code == 0
    assert [r["key"] for r in json.loads(out)] == ["qwen3-8b"]


def test_catalog_says_a_long_fragment_matched_nothing_in_one_short_line() -> None:
    code, out, _ = gantry("catalog", "z" * 100_000)
    assert code == 0
    assert out.count("\n") == 1 and len(out) < 200, out[:300]
    assert out.startswith(f"no catalogue model matches '{'z' * 80}'... (100000 characters)"), out[:300]


HEAVY = ("numpy", "faststream", "fastapi", "aiohttp", "ops.stack", "ops.cli.web", "ops.cli.simulate",
         "shared.core.sim", "shared.core.placement.pipeline", "shared.bus.runtime")
# what each read command imports after it is looked up (the modules its body imports where it runs)
READ_COMMANDS = {
    "models": "",
    "workers": "",
    "instances": "",
    "explain": "from ops.cli.common import import_nats; import_nats('nats://127.0.0.1:1')\n"
               "import nats.js.errors, ops.events, shared.bus.messages, shared.bus.streams\n",
    "events": "from ops.cli.common import import_nats; import_nats('nats://127.0.0.1:1')\n"
              "import nats.js.api, nats.js.errors, ops.events, shared.bus.streams\n",
}


@pytest.mark.parametrize("command", sorted(READ_COMMANDS))
def test_a_read_command_loads_no_heavy_module(command: str) -> None:
    """What `gantry models|workers|instances|explain|events` imports (the fast CLI's budget): no numpy, no
    simulator, no web server, no service framework, no websocket client."""
    probe = (
        "import sys\n"
        "from ops.cli.main import app\n"
        "import typer.main\n"
        "group = typer.main.get_command(app)\n"
        f"group.get_command(None, {command!r})\n"
        "import ops.cli.client, ops.cli.common, shared.state, shared.settings, redis.asyncio, rich.table\n"
        f"{READ_COMMANDS[command]}"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
                          env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"heavy modules loaded: {done.stdout.strip()}"


@pytest.mark.parametrize("command", ["explain", "events"])
def test_a_command_that_prints_no_table_loads_no_rich(command: str) -> None:
    """`explain` and `events` print plain lines: the table library (~50 ms of imports) stays unloaded."""
    probe = (
        "import sys\n"
        "from ops.cli.main import app\n"
        "import typer.main\n"
        "group = typer.main.get_command(app)\n"
        f"group.get_command(None, {command!r})\n"
        "import ops.cli.client, ops.cli.common, shared.state, shared.settings, redis.asyncio\n"
        f"{READ_COMMANDS[command]}"
        "print(','.join(m for m in sys.modules if m == 'rich' or m.startswith('rich.')))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
                          env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"rich loaded: {done.stdout.strip()}"


def test_status_without_a_stack_says_so_in_one_line_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GANTRY_HOME", str(tmp_path))
    code, out, err = gantry("status")
    assert code == 1
    assert out.startswith("gantry up: not running from ")
    assert err.startswith("error: cannot reach NATS") and err.count("\n") == 1


def test_status_json_without_a_stack_prints_no_text_for_a_script_to_misread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GANTRY_HOME", str(tmp_path))
    code, out, err = gantry("status", "--json")
    assert code == 1 and out == ""
    assert err.startswith("error: cannot reach NATS") and err.count("\n") == 1
