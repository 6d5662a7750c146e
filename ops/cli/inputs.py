"""Reading the files a user names on the command line (scenarios, specs, profiles)."""

from __future__ import annotations

from pathlib import Path

from ops.cli.errors import CliError


def read_input_file(path: Path, what: str) -> bytes:
    """The file's bytes, or a CliError with exit code 2 naming ``what`` could not be read and why."""
    try:
        return path.read_bytes()
    except OSError as err:
        raise CliError(f"cannot read {what} {path}: {err.strerror or err}", exit_code=2) from None
