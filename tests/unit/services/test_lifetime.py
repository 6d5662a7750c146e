"""Children started through the exec wrapper die with their parent and never start as orphans; the wrapper needs
no pre-exec hook, so no fork handler of the parent runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from shared.host.lifetime import dying_with_parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def test_through_the_wrapper_a_child_whose_parent_is_already_gone_exits_before_it_starts() -> None:
    argv = dying_with_parent([sys.executable, "-c", "print('started')"], os.environ, os.getpid() + 1_000_000)
    proc = subprocess.run(argv, capture_output=True, timeout=30)
    assert proc.returncode == 1 and proc.stdout == b""


def test_through_the_wrapper_a_child_runs_its_command_in_its_place_ignoring_what_a_plain_child_ignores() -> None:
    # exec in place (the pid Popen knows is the command's) and none of the signals the wrapper's interpreter ignores
    command = ["sh", "-c", 'echo $$; grep SigIgn /proc/self/status']
    wrapped = subprocess.Popen(dying_with_parent(command, os.environ), stdout=subprocess.PIPE)
    out, _ = wrapped.communicate(timeout=30)
    pid, ignored = out.decode().splitlines()
    plain = subprocess.run(command, capture_output=True, timeout=30).stdout.decode().splitlines()[1]
    assert wrapped.returncode == 0 and int(pid) == wrapped.pid and ignored == plain


def test_through_the_wrapper_a_command_that_cannot_run_exits_127_saying_so() -> None:
    proc = subprocess.run(dying_with_parent(["/nonexistent/gantry-x"], os.environ), capture_output=True, timeout=30)
    assert proc.returncode == 127 and b"cannot run /nonexistent/gantry-x" in proc.stderr


WRAPPED_MIDDLE = (
    "import os, subprocess, sys, time\n"
    "from shared.host.lifetime import dying_with_parent\n"
    "os.register_at_fork(before=lambda: print('fork handler ran', flush=True))\n"
    "argv = dying_with_parent([sys.executable, '-c', 'import time; time.sleep(60)'], os.environ)\n"
    "p = subprocess.Popen(argv, start_new_session=True)\n"
    "print(p.pid, flush=True)\n"
    "time.sleep(60)\n"
)


def test_through_the_wrapper_a_child_is_terminated_when_its_parent_is_killed_and_no_fork_handler_ran() -> None:
    middle = subprocess.Popen([sys.executable, "-c", WRAPPED_MIDDLE], stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert middle.stdout is not None
    first = middle.stdout.readline()
    assert first.strip().isdigit(), first  # not "fork handler ran": spawned without fork()
    sleeper = int(first)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not _runs_the_command(sleeper):
        time.sleep(0.02)
    assert _runs_the_command(sleeper)
    middle.kill()
    middle.wait(10)
    while time.monotonic() < deadline and _alive(sleeper):
        time.sleep(0.05)
    assert not _alive(sleeper)


def _runs_the_command(pid: int) -> bool:
    """The sleeper itself, past the wrapper's exec (its command line names the wrapper until then)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except FileNotFoundError:
        return False
    return b"time.sleep(60)" in cmdline and b"pdeathsig_exec" not in cmdline


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
