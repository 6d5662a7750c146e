"""The read commands' fast path (issue 17): it reads a command line only when its meaning is beyond doubt, gives
then exactly what the Typer app gives (output, one-line errors, exit codes), and loads neither typer nor pydantic.
The same comparison against a running stack is in tests/integration/cli/test_fast_path.py."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest

from ops.cli.app import run_app
from ops.cli.fast import parse
from ops.cli.main import main
from ops.servers import ServerProcess, free_port
from shared.paths import REPO_ROOT


@pytest.fixture(autouse=True)
def no_stack(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Ports nothing listens on, and a home without credentials."""
    monkeypatch.setenv("GANTRY_HOME", str(tmp_path))
    monkeypatch.setenv("GANTRY_NATS_URL", f"nats://127.0.0.1:{free_port()}")
    monkeypatch.setenv("GANTRY_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")


PLAIN = [
    (["models"], "models", {"show_all": False, "json_out": False, "nats_url": None, "redis_url": None}),
    (["models", "--all", "--json"], "models", {"show_all": True, "json_out": True, "nats_url": None,
                                               "redis_url": None}),
    (["workers", "--json", "--json"], "workers", {"json_out": True, "nats_url": None, "redis_url": None}),
    (["instances", "-m", "a", "--model", "b"], "instances",  # the last one wins, as in click
     {"model": "b", "json_out": False, "nats_url": None, "redis_url": None}),
    (["instances", "--model=x-1"], "instances", {"model": "x-1", "json_out": False, "nats_url": None,
                                                 "redis_url": None}),
    (["explain", "--json", "m", "--redis-url", "redis://h:1/0"], "explain",
     {"model": "m", "json_out": True, "nats_url": None, "redis_url": "redis://h:1/0"}),
    (["explain", "m", "--nats-url="], "explain", {"model": "m", "json_out": False, "nats_url": "", "redis_url": None}),
]


@pytest.mark.parametrize("argv,function,params", PLAIN, ids=[" ".join(a) for a, _, _ in PLAIN])
def test_a_plain_read_command_line_is_read_as_typer_reads_it(
    argv: list[str], function: str, params: dict[str, object]
) -> None:
    assert parse(argv) == (function, params)


# Lines the fast path leaves to the Typer app: help, usage mistakes, other commands, anything less plain.
NOT_PLAIN = [
    [], ["--help"], ["--version"], ["models", "--help"], ["models", "-h"], ["explain"], ["explain", "a", "b"],
    ["explain", "--", "-m"], ["models", "extra"], ["models", "--bogus"], ["models", "--json=1"], ["models", "--al"],
    ["instances", "-m"], ["instances", "-mfoo"], ["instances", "-m=foo"], ["instances", "-m", "-x"],
    ["instances", "--all"], ["models", "--redis-url"], ["models", "--redis-url", "--json"], ["workers", "remove"],
    ["workers", "remove", "w0"], ["modles"], ["events"], ["top"], ["deploy", "x.yaml"], ["models", "-"],
    ["explain", "-"], ["Models"],
]


@pytest.mark.parametrize("argv", NOT_PLAIN, ids=[" ".join(a) or "(nothing)" for a in NOT_PLAIN])
def test_anything_less_plain_is_left_to_the_typer_app(argv: list[str]) -> None:
    assert parse(argv) is None


def outcome(run: object, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = run(argv)  # type: ignore[operator]
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


# Command lines the fast path runs (and some it leaves), all failing some way without a stack: each must end
# exactly as the Typer app ends it.
SAME_AS_TYPER = [
    ["models"], ["models", "--all", "--json"], ["workers"], ["workers", "--json"], ["instances"],
    ["instances", "-m", "llama-8b"], ["explain", "llama-8b"], ["explain", "llama-8b", "--json"],
    ["explain", "a/b"], ["explain", "x" * 64], ["explain", ""], ["instances", "-m", "bad name"],
    ["instances", "--model="],
    ["models", "--redis-url", "notaurl"], ["models", "--redis-url", "redis://127.0.0.1:99999/0"],
    ["models", "--redis-url", "redis://h:port/0"], ["models", "--redis-url", "unix:///nonexistent/sock"],
    ["explain", "m", "--nats-url", "nats://127.0.0.1:99999"],
    ["models", "--bogus"], ["models", "--json=1"], ["explain"], ["explain", "a", "b"], ["instances", "-m"],
    ["workers", "remove"],
]


@pytest.mark.parametrize("argv", SAME_AS_TYPER, ids=[" ".join(a)[:40] for a in SAME_AS_TYPER])
def test_the_fast_path_ends_a_command_exactly_as_the_typer_app(argv: list[str]) -> None:
    fast = outcome(main, argv)
    typer_app = outcome(run_app, argv)
    assert fast == typer_app
    code, _, err = fast
    assert code in (1, 2) and err.startswith("error: ") and err.count("\n") == 1, fast


def test_a_bad_environment_value_is_the_same_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GANTRY_NOT_READY_AFTER_S", "-3")
    fast = outcome(main, ["models"])
    assert fast == outcome(run_app, ["models"])
    assert fast[0] == 2 and fast[2].startswith("error: invalid setting GANTRY_NOT_READY_AFTER_S: "), fast


def test_a_bad_url_flag_is_named_as_the_flag_not_as_the_environment() -> None:
    fast = outcome(main, ["models", "--redis-url", "redis://127.0.0.1:1/gantry"])
    assert fast == outcome(run_app, ["models", "--redis-url", "redis://127.0.0.1:1/gantry"])
    assert fast[0] == 2 and fast[2] == (
        "error: invalid --redis-url: the database (the path of the URL) must be a number, got 'gantry'\n"), fast


SLOW_MODULES = ("typer", "click", "pydantic", "pydantic_settings", "numpy", "redis", "asyncio")
# each read command on an empty database, and how it ends there
ON_EMPTY_STATE = [(["models"], 0), (["workers", "--json"], 0), (["instances"], 0), (["instances", "-m", "x"], 1),
                  (["explain", "x"], 1)]


@pytest.mark.parametrize("argv,code", ON_EMPTY_STATE, ids=[" ".join(a) for a, _ in ON_EMPTY_STATE])
def test_a_plain_read_command_loads_neither_typer_nor_pydantic_nor_redis_py(
    argv: list[str], code: int, tmp_path: Path, redis_server: ServerProcess
) -> None:
    """The fast path's budget: the command runs to its end on a real (empty) Redis without the modules that made a
    read command cost 0.6 s (typer, pydantic) or half of what remained (redis-py with asyncio)."""
    probe = (
        "import sys\n"
        "from ops.cli.main import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as exc:\n"
        f"    assert exc.code == {code}, exc.code\n"
        f"print('loaded:' + ','.join(m for m in sys.modules if m.split('.')[0] in {SLOW_MODULES!r}))\n"
    )
    empty = redis_server.url.rsplit("/", 1)[0] + "/6"
    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "GANTRY_HOME": str(tmp_path),
           "GANTRY_REDIS_URL": empty}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "loaded:", done.stdout


def test_without_redis_the_command_reads_through_redis_py_for_its_error(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "GANTRY_HOME": str(tmp_path),
           "GANTRY_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    done = subprocess.run([sys.executable, "-m", "ops.cli", "models"], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=60, env=env)
    assert done.returncode == 1 and done.stderr.startswith("error: cannot reach Redis at ") and not done.stdout


def test_help_of_a_read_command_still_comes_from_typer() -> None:
    code, out, _ = outcome(main, ["models", "--help"])
    assert code == 0 and "--all" in out and "--redis-url" in out
