"""The benchmarks' progress (issue 17): on stderr, drawn on a terminal or on request, silent otherwise, and a
bench's last stdout line stays its JSON."""

from __future__ import annotations

import io
import json
import subprocess
import sys

from bench.progress import Progress, progress
from shared.paths import REPO_ROOT


class Tty(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_one_bar_redrawn_in_place_and_ended_with_a_newline() -> None:
    out = Tty()
    assert list(progress(range(3), 3, "runs", stream=out)) == [0, 1, 2]
    text = out.getvalue()
    assert text.count("\r") == 4  # the empty bar, then one redraw per step
    assert "runs [" in text and "3/3" in text and text.endswith("\n")
    assert text.count("\n") == 1


def test_a_stream_that_is_not_a_terminal_gets_nothing() -> None:
    out = io.StringIO()
    assert list(progress(range(3), 3, "runs", stream=out)) == [0, 1, 2]
    assert out.getvalue() == ""


def test_the_flag_forces_plain_lines_on_a_non_terminal() -> None:
    out = io.StringIO()
    bar = Progress(2, "rounds", stream=out, force=True)
    bar.step("round 0 done")
    bar.step("round 1 done")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()
    assert lines[0].startswith("rounds [") and "1/2" in lines[0] and lines[0].endswith("round 0 done")
    assert "2/2" in lines[1]


def test_steps_past_the_total_stop_at_the_total() -> None:
    bar = Progress(1, "x", stream=io.StringIO(), force=True)
    bar.step(n=5)
    assert bar.done == 1 and "1/1" in bar.line()


def test_a_zero_total_shows_a_full_bar() -> None:
    assert "[" + "#" * 24 + "] 0/0" in Progress(0, "x", stream=io.StringIO()).line()


def test_a_bench_with_progress_keeps_its_json_as_the_last_stdout_line() -> None:
    code = (
        "import json, sys\n"
        "from bench.progress import progress\n"
        "for _ in progress(range(3), 3, 'runs', force=True): print('run line')\n"
        "print(json.dumps({'ok': 1}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": str(REPO_ROOT)})
    assert json.loads(done.stdout.splitlines()[-1]) == {"ok": 1}
    assert "runs [" not in done.stdout and done.stderr.count("runs [") == 4
