"""One real local stack for every CLI test: `gantry up --workers 4 --demo` in a pseudo-terminal.

The stack is exactly what an operator gets (real nats-server and redis-server, the four placement
services and emulated workers as child processes), on free ports with a password on Redis, under a
temporary GANTRY_HOME. It is started once for this package and stopped with `gantry down`.
"""

from __future__ import annotations

import io
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pexpect
import pytest

from ops.cli.main import main
from ops.servers import free_port

GANTRY = str(Path(sys.executable).parent / "gantry")
UP_TIMEOUT_S = 120


@dataclass
class Stack:
    """A running `gantry up` and the environment that reaches it."""

    env: dict[str, str]
    process: pexpect.spawn
    startup_output: str
    home: Path
    output_log: Path  # everything `gantry up` printed, kept current by a drain thread

    def output(self) -> str:
        """What `gantry up` has printed so far."""
        return self.output_log.read_text(errors="replace")


def drain(child: pexpect.spawn) -> None:
    """Keep reading the child's terminal so its status line never blocks on a full pty buffer."""
    while child.isalive():
        try:
            child.read_nonblocking(65536, timeout=0.5)
        except pexpect.TIMEOUT:
            continue
        except (pexpect.EOF, OSError, ValueError):
            return


@dataclass
class Result:
    """What one CLI invocation printed and returned."""

    code: int
    out: str
    err: str


def stack_env(home: Path, nats_port: int, redis_port: int, web_port: int = 0) -> dict[str, str]:
    """The process environment for a stack (and its CLI) on the given ports (web view: 0, none)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GANTRY_")}
    env.update(
        GANTRY_WEB_PORT=str(web_port),
        GANTRY_HOME=str(home),
        GANTRY_NATS_URL=f"nats://127.0.0.1:{nats_port}",
        GANTRY_REDIS_URL=f"redis://:cli-test-pw@127.0.0.1:{redis_port}/0",
        GANTRY_JS_STORAGE="memory",
        COLUMNS="160",
    )
    if "GANTRY_DATA_DIR" in os.environ:
        env["GANTRY_DATA_DIR"] = os.environ["GANTRY_DATA_DIR"]
    return env


def spawn(args: list[str], env: dict[str, str], timeout: float = 30) -> pexpect.spawn:
    """``gantry ARGS`` in a 50x160 pseudo-terminal."""
    return pexpect.spawn(
        GANTRY, args, env=env, encoding="utf-8", codec_errors="replace", dimensions=(50, 160), timeout=timeout
    )


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`gantry up --workers 4 --demo`, ready once the demo has reported; stopped after this package's
    tests so it does not load the machine while the rest of the suite runs."""
    home = tmp_path_factory.mktemp("gantry-home")
    env = stack_env(home, free_port(), free_port(), web_port=free_port())
    child = spawn(["up", "--workers", "4", "--demo"], env, timeout=UP_TIMEOUT_S)
    log = home / "up-output.txt"
    child.logfile_read = log.open("w", encoding="utf-8")
    try:
        child.expect(r"Ctrl-C \(or `gantry down`\) stops everything")
    except (pexpect.EOF, pexpect.TIMEOUT):
        child.terminate(force=True)
        pytest.fail(f"gantry up did not come up:\n{child.before}")
    up = Stack(env=env, process=child, startup_output=child.before, home=home, output_log=log)
    reader = threading.Thread(target=drain, args=(child,), daemon=True)
    reader.start()
    yield up
    down = run_cli(["down"], env)
    reader.join(timeout=40)
    child.close()
    child.logfile_read.close()
    assert down.code == 0, down.err
    assert child.exitstatus == 0, up.output()[-2000:]
    assert up.output().rstrip().endswith("stopped")


def run_cli(args: list[str], env: dict[str, str]) -> Result:
    """Run the CLI in this process (fast) with ``env`` as the environment; exit code and output."""
    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    code = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture
def gantry(stack: Stack) -> Callable[..., Result]:
    """``gantry(*args)`` against the session stack."""

    def invoke(*args: str) -> Result:
        return run_cli(list(args), stack.env)

    return invoke
