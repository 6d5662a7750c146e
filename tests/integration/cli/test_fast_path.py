"""The read commands' fast path against the real stack (issue 17): `gantry models|workers|instances|explain` print
exactly what the Typer app prints for the same command line, tables, JSON, pending reasons and errors alike."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from ops.cli.app import run_app
from ops.cli.fast import parse
from ops.cli.main import main
from shared.paths import REPO_ROOT
from tests.integration.cli.conftest import Result, Stack, run_cli

pytestmark = pytest.mark.integration
T = TypeVar("T")

Gantry = Callable[..., Result]

COMMAND_LINES = [
    ["models"], ["models", "--all"], ["models", "--json"], ["workers"], ["instances"], ["instances", "--json"],
    ["instances", "-m", "llama-8b"], ["instances", "--model=slow-huge"], ["explain", "llama-8b"],
    ["explain", "llama-8b", "--json"], ["explain", "slow-huge"], ["explain", "slow-huge", "--json"],
    ["explain", "not-deployed"], ["instances", "-m", "not-deployed"], ["explain", "bad/name"],
]


@pytest.fixture(scope="module")
def pending_model(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A model nothing can hold, so that `explain` has pending replicas and a scheduler verdict to show."""
    spec = tmp_path_factory.mktemp("fast") / "slow-huge.yaml"
    spec.write_text("name: slow-huge\nsource: meta-llama/Meta-Llama-3.1-405B\ncatalog_model: meta-llama-3.1-405b\n"
                    "replicas: 1\n")
    assert run_cli(["deploy", str(spec)], stack.env).code == 0
    deadline = time.monotonic() + 30
    while True:
        shown = json.loads(run_cli(["explain", "slow-huge", "--json"], stack.env).out)
        if (shown["pending"] and shown["last_unschedulable"]) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    yield "slow-huge"
    run_cli(["scale", "slow-huge", "0"], stack.env)


@pytest.mark.parametrize("argv", COMMAND_LINES, ids=[" ".join(a) for a in COMMAND_LINES])
def test_a_read_command_prints_what_the_typer_app_prints(stack: Stack, pending_model: str, argv: list[str]) -> None:
    assert parse(argv) is not None  # the fast path runs it
    fast, typer_app = both(lambda: run_cli(argv, stack.env), lambda: run_cli(argv, stack.env, entry=run_app))
    assert fast == typer_app
    assert fast.out or fast.err.startswith("error: ")


def both(fast: Callable[[], T], typer_app: Callable[[], T], tries: int = 3) -> tuple[T, T]:
    """Both outcomes, taken again (up to ``tries`` times) while they differ: the stack moves on between two calls
    (a pending replica gets a new verdict, with its time, every few seconds); a real difference stays."""
    for _ in range(tries):
        mine, theirs = fast(), typer_app()
        if mine == theirs:
            break
    return mine, theirs


def without_ages(text: str) -> object:
    rows = json.loads(text)
    for row in rows:
        row.pop("heartbeat_age_s")
    return rows


def test_workers_json_is_the_same_but_for_the_heartbeat_ages(stack: Stack) -> None:
    def workers(entry: Callable[[list[str]], object] = main) -> tuple[int, object]:
        got = run_cli(["workers", "--json"], stack.env, entry=entry)
        return got.code, without_ages(got.out) if got.code == 0 else got.err

    # taken again while they differ: a heartbeat between the two reads may move a GPU's figures
    fast, typer_app = both(workers, functools.partial(workers, run_app))
    assert fast[0] == typer_app[0] == 0
    assert fast == typer_app


def test_the_console_script_prints_what_the_typer_app_prints(stack: Stack, pending_model: str) -> None:
    """Through real processes and pipes, as an operator's shell runs them."""
    env = {**stack.env, "PYTHONPATH": str(REPO_ROOT)}
    app = "import sys\nfrom ops.cli.app import run_app\nsys.exit(run_app(sys.argv[1:]))"

    def outcome(*command: str) -> tuple[int, str, str]:
        done = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                              timeout=60)
        return done.returncode, done.stdout, done.stderr

    for argv in (["models"], ["explain", pending_model]):
        script, typer_app = both(functools.partial(outcome, "-m", "ops.cli", *argv),
                                 functools.partial(outcome, "-c", app, *argv))
        assert script == typer_app
        assert script[0] == 0 and script[1]
