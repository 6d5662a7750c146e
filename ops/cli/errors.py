"""The one error type CLI commands raise for conditions a user can fix."""

from __future__ import annotations


class CliError(Exception):
    """Printed as ``error: <message>`` with ``exit_code`` (2 for bad input, 1 otherwise)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(Exception):
    """Ctrl-C during a command: it ends quietly with exit code 130."""
