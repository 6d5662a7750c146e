"""Ctrl-C at any moment of a CLI call ends it quietly with exit code 130: also while the command's modules are
still loading, before any command's own handling is in place (that printed a traceback)."""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import io
import signal
import sys
from collections.abc import Sequence
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
