"""The one error type CLI commands raise for conditions a user can fix, and the one escaping of what an error
line shows."""

from __future__ import annotations

from ops.text import escaped as escaped  # re-exported: every error line passes through it


def quoted(value: object) -> str:
    """``value`` in quotes for a CliError message, which escapes it once (a ``repr`` would escape it a first time,
    and a backslash in it would show doubled twice)."""
    return f"'{value}'"


class CliError(Exception):
    """Printed as ``error: <message>`` with ``exit_code`` (2 for bad input, 1 otherwise); the message is kept
    escaped (``escaped``), so it prints safely wherever it goes."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(escaped(message))
        self.exit_code = exit_code


class Interrupted(Exception):
    """Ctrl-C during a command: it ends quietly with exit code 130."""
