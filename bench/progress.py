"""Progress of a long benchmark, on stderr only (issue 17: "benchmarks (a progress bar)").

A benchmark's last stdout line is its JSON result, so progress never touches stdout. It is drawn when stderr
is a terminal (one bar redrawn in place) or when ``--progress`` asks for it (then one plain line per step, fit
for a log file); otherwise it is silent.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")
BAR_CELLS = 24


def add_flag(parser: argparse.ArgumentParser) -> None:
    """``--progress``: report progress on stderr even when it is not a terminal."""
    parser.add_argument("--progress", action="store_true",
                        help="report progress on stderr even when it is not a terminal (never on stdout)")


class Progress:
    """Counts steps of a known ``total`` and reports them on ``stream`` (stderr by default)."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, force: bool = False) -> None:
        self.total = max(0, total)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream)
        self.enabled = self.tty or force
        self.done = 0
        self.started = time.monotonic()

    def line(self, note: str = "") -> str:
        """The progress as one line: label, bar, count, elapsed time, and what is running."""
        frac = self.done / self.total if self.total else 1.0
        filled = round(frac * BAR_CELLS)
        bar = "#" * filled + "." * (BAR_CELLS - filled)
        tail = f" {note}" if note else ""
        return f"{self.label} [{bar}] {self.done}/{self.total} {time.monotonic() - self.started:.0f}s{tail}"

    def step(self, note: str = "", n: int = 1) -> None:
        """``n`` more steps done; ``note`` says what comes next."""
        self.done = min(self.total, self.done + n)
        self.show(note)

    def show(self, note: str = "") -> None:
        """Draw the current state (in place on a terminal, a new line otherwise)."""
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r\x1b[2K" + self.line(note))
            if self.done >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(self.line(note) + "\n")
        self.stream.flush()


def progress(items: Iterable[T], total: int, label: str, force: bool = False, stream: TextIO | None = None,
             note: str = "") -> Iterator[T]:
    """Yield ``items``, reporting each one done (``total`` of them) as :class:`Progress` does."""
    bar = Progress(total, label, stream, force)
    bar.show(note)
    for item in items:
        yield item
        bar.step(note)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream: no terminal
        return False


__all__ = ["Progress", "add_flag", "progress"]
