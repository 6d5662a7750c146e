"""Children started with the shared pre-exec hook die with their parent, and never start as orphans."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from functools import partial

import pytest

from shared.host.lifetime import die_with_parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def test_a_child_whose_parent_is_already_gone_exits_before_it_starts() -> None:
    # A parent pid that is not the child's parent stands for a parent that died between fork and the hook.
    proc = subprocess.run([sys.executable, "-c", "print('started')"], capture_output=True, timeout=30,
                          preexec_fn=partial(die_with_parent, os.getpid() + 1_000_000))
    assert proc.returncode == 1 and proc.stdout == b""


def test_a_child_of_a_living_parent_starts() -> None:
    proc = subprocess.run([sys.executable, "-c", "print('started')"], capture_output=True, timeout=30,
                          preexec_fn=partial(die_with_parent, os.getpid()))
    assert proc.returncode == 0 and proc.stdout == b"started\n"


def test_a_child_is_terminated_when_its_parent_is_killed() -> None:
    # The middle process starts a sleeper with the hook, prints its pid and is SIGKILLed: the sleeper must go too.
    middle = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys, time\n"
         "from shared.host.lifetime import die_with_parent\n"
         "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], preexec_fn=die_with_parent)\n"
         "print(p.pid, flush=True)\n"
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert middle.stdout is not None
    sleeper = int(middle.stdout.readline())
    middle.kill()
    middle.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(sleeper):
        time.sleep(0.05)
    assert not _alive(sleeper)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
