"""The ``gantry`` console script: the read commands' fast path first, the Typer app (``ops.cli.app``) otherwise.

``gantry models``, ``workers``, ``instances`` and ``explain`` with plain options run without loading typer or
pydantic (``ops.cli.fast``; issue 17: read commands within 0.5 s, and typer with its parameter handling was
a third of a call). Every other command line, help, a usage mistake or anything the fast path does not read
exactly as typer would, goes to the Typer app, which runs the same command functions.
"""

from __future__ import annotations

import sys
from typing import Any


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs ``argv`` (``sys.argv[1:]`` when None) and exits with its status."""
    args = sys.argv[1:] if argv is None else list(argv)
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
