"""The ``gantry`` console script: the read commands' fast path first, the Typer app (``ops.cli.app``) otherwise.

``gantry models``, ``workers``, ``instances`` and ``explain`` with plain options run without loading typer or
pydantic (``ops.cli.fast``; issue 17: read commands within 0.5 s, and typer with its parameter handling was
a third of a call). Every other command line, help, a usage mistake or anything the fast path does not read
exactly as typer would, goes to the Typer app, which runs the same command functions.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

URL_FLAGS = {"--nats-url": "GANTRY_NATS_URL", "--redis-url": "GANTRY_REDIS_URL"}
"""Every command's connection flags, and the environment variable that carries the same URL."""


def secret_on_command_line(args: Sequence[str]) -> str | None:
    """The error for a ``--nats-url``/``--redis-url`` holding a user or secret anywhere in ``args``, else None.

    A command line is readable by every local user (``ps``), a process's environment only by its owner: the
    services refuse such a URL on theirs (``shared.envsettings.credentials_on_command_line``), and so does the
    CLI, before any command runs (both ``--nats-url URL`` and ``--nats-url=URL``; words after ``--`` are no
    options)."""
    from shared.envsettings import credentials_on_command_line

    for i, word in enumerate(args):
        if word == "--":
            return None
        flag, eq, inline = word.partition("=")
        if flag not in URL_FLAGS:
            continue
        url = inline if eq else (args[i + 1] if i + 1 < len(args) else None)
        if refused := credentials_on_command_line(flag, url, URL_FLAGS[flag]):
            return refused
    return None


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs ``argv`` (``sys.argv[1:]`` when None) and exits with its status."""
    args = sys.argv[1:] if argv is None else list(argv)
    if refused := secret_on_command_line(args):
        print(f"error: {refused}", file=sys.stderr)
        sys.exit(2)
    from ops.cli.fast import dispatch

    code = dispatch(args)
    if code is None:
        from ops.cli.app import run_app

        code = run_app(args)
    sys.exit(code)


def __getattr__(name: str) -> Any:
    # The Typer app and its helpers, for callers that knew them here (tests, docs checks); loading them costs
    # the typer import, so only on use.
    if name in ("app", "usage_line", "version", "LazyGroup", "COMMANDS"):
        from ops.cli import app as typer_app

        return getattr(typer_app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
