"""The one error type CLI commands raise for conditions a user can fix."""

from __future__ import annotations

# Control characters in a message (a file name holding a newline or an escape sequence, echoed back) are shown
# escaped: the error stays one line on stderr, and a name cannot drive the user's terminal.
_ESCAPES = {c: repr(chr(c))[1:-1] for c in (*range(0x20), *range(0x7F, 0xA0))}


class CliError(Exception):
    """Printed as ``error: <message>`` with ``exit_code`` (2 for bad input, 1 otherwise)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message.translate(_ESCAPES))
        self.exit_code = exit_code


class Interrupted(Exception):
    """Ctrl-C during a command: it ends quietly with exit code 130."""
