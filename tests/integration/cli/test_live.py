"""Live views driven in a pseudo-terminal: `gantry top` (read back as a screen) and `events --follow`."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable

import pexpect
import pyte
import pytest

from tests.integration.cli.conftest import Result, Stack, spawn

pytestmark = pytest.mark.integration

Gantry = Callable[..., Result]
ROWS, COLS = 50, 160


class Terminal:
    """A child process in a pty, its output replayed on an emulated VT100 screen."""

    def __init__(self, child: pexpect.spawn) -> None:
        self.child = child
        self.screen = pyte.Screen(COLS, ROWS)
        self.stream = pyte.Stream(self.screen)

    def text(self) -> str:
        return "\n".join(line.rstrip() for line in self.screen.display)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 30) -> str:
        """Feed output to the screen until ``predicate(screen text)`` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(pexpect.TIMEOUT):
                self.stream.feed(self.child.read_nonblocking(65536, timeout=0.5))
            screen = self.text()
            if predicate(screen):
                return screen
        raise AssertionError(f"screen never matched; last screen:\n{self.text()}")


def row_of(screen: str, worker: str) -> tuple[str, str]:
    """The two lines of a worker's row in the GPU grid (name + bars, state + models)."""
    lines = screen.splitlines()
    for i, line in enumerate(lines[:-1]):
        if re.match(rf"│ {worker}\s+│", line):
            return line, lines[i + 1]
    return "", ""  # not drawn (yet): the screen may be caught mid-redraw


def test_top_draws_workers_gpus_and_models_and_follows_changes(stack: Stack, gantry: Gantry) -> None:
    term = Terminal(spawn(["top", "--interval", "0.5"], stack.env))
    try:
        screen = term.wait_for(lambda s: all(f"│ w{i} " in s for i in range(4)) and "llama-70b" in s)
        assert "GPU0" in screen and "GPU7" in screen
        assert "workers 4 (4 ready)" in screen
        rows = [row_of(screen, f"w{i}") for i in range(4)]
        bars, state = next(row for row in rows if "llama-70b" in row[1])
        assert bars.count(" 90%") >= 4 and state.count("llama-70b") == 4 and "READY" in state
        assert gantry("cordon", "w3:5").code == 0
        term.wait_for(lambda s: "cordoned" in row_of(s, "w3")[1])
    finally:
        gantry("uncordon", "w3:5")
        term.child.sendintr()
        term.child.expect(pexpect.EOF, timeout=15)
        term.child.close()
    assert term.child.exitstatus == 130 or term.child.signalstatus is not None


def test_events_follow_prints_new_placements_until_ctrl_c(stack: Stack, gantry: Gantry) -> None:
    child = spawn(["events", "--follow", "--last", "0", "--model", "llama-8b"], stack.env)
    try:
        child.expect("following events; Ctrl-C to stop", timeout=30)  # subscribed: nothing can be missed
        assert gantry("scale", "llama-8b", "3").code == 0
        child.expect(r"placed\s+llama-8b \S+ -> w\d GPU \d", timeout=30)
        child.expect(r"instance\s+llama-8b \S+ RUNNING on w\d", timeout=30)
    finally:
        child.sendintr()
        child.expect(pexpect.EOF, timeout=15)
        child.close()
        assert gantry("scale", "llama-8b", "2", "--wait").code == 0
    assert child.exitstatus == 0
