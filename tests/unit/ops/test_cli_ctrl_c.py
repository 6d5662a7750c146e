"""Ctrl-C at any moment of a CLI call ends it quietly with exit code 130: also while the command's modules are
still loading, before any command's own handling is in place (that printed a traceback), down to the console
script's own first import (what comes before it is Python's start-up, out of Gantry's reach)."""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import io
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import pytest

from ops.cli.main import main


class CtrlCWhileLoading(importlib.abc.MetaPathFinder):
    """Delivers a real SIGINT (as Ctrl-C does) the moment ``module`` is imported."""

    def __init__(self, module: str) -> None:
        self.module = module

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == self.module:
            signal.raise_signal(signal.SIGINT)
        return None


@pytest.mark.parametrize("module", ["ops.cli.fast", "ops.cli.app"])
def test_ctrl_c_while_the_cli_loads_exits_130_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, module: str
) -> None:
    monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setattr(sys, "meta_path", [CtrlCWhileLoading(module), *sys.meta_path])
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
            pytest.raises(SystemExit) as ended:
        main(["deploy", "--help"])
    assert ended.value.code == 130
    assert err.getvalue() == ""


def _import_cli_then_ctrl_c(argv0: str) -> subprocess.CompletedProcess[str]:
    """A process named ``argv0`` that imports the console script's module, then gets a real SIGINT before ``main``
    runs (as a Ctrl-C within the first ~50 ms of `gantry ...` does)."""
    code = (f"import sys; sys.argv[0] = {argv0!r}; import os, signal, time; import ops.cli.main; "
            "signal.raise_signal(signal.SIGINT); time.sleep(5); print('still running')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[3])


def test_ctrl_c_before_main_runs_exits_130_without_a_traceback() -> None:
    done = _import_cli_then_ctrl_c("/usr/local/bin/gantry")
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "")


def test_a_program_importing_the_cli_module_keeps_its_own_ctrl_c() -> None:
    done = _import_cli_then_ctrl_c("pytest")
    assert done.returncode != 130 and "KeyboardInterrupt" in done.stderr


def test_main_hands_ctrl_c_back_to_python_once_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    import ops.cli.main as cli

    monkeypatch.setattr(cli, "run", lambda args: 0)
    previous = signal.signal(signal.SIGINT, cli._interrupted_while_loading)
    try:
        with pytest.raises(SystemExit):
            main([])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
