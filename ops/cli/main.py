"""The ``gantry`` console script: the read commands' fast path first, the Typer app (``ops.cli.app``) otherwise.

``gantry models``, ``workers``, ``instances`` and ``explain`` with plain options run without loading typer or
pydantic (``ops.cli.fast``; issue 17: read commands within 0.5 s, and typer with its parameter handling was
a third of a call). Every other command line, help, a usage mistake or anything the fast path does not read
exactly as typer would, goes to the Typer app, which runs the same command functions.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any


def _interrupted_while_loading(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C before ``main`` runs: exit as an interrupted command, without a traceback from inside an import."""
    os._exit(130)


# The console script imports this module before ``main`` can catch anything, and the imports below take tens of
# ms; a Ctrl-C then printed a KeyboardInterrupt traceback from deep inside importlib. Only in the console script:
# a test or a program importing this module keeps its own Ctrl-C.
if os.path.basename(sys.argv[0]) == "gantry" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_while_loading)

from ops.cli.connect import URL_FLAGS  # noqa: E402


def secret_on_command_line(args: Sequence[str]) -> str | None:
    """The error for a ``--nats-url``/``--redis-url`` holding a user or secret anywhere in ``args``, else None.

    A command line is readable by every local user (``ps``), a process's environment only by its owner: the
    services refuse such a URL on theirs (``shared.envsettings.credentials_on_command_line``), and so does the
    CLI, before any command runs: ``--nats-url URL``, ``--nats-url=URL`` or an abbreviation (``url_flag``).

    The scan does not stop at ``--``. It runs before click parses the line, and click takes a ``--`` that follows
    an option wanting a value as that value (``gantry up --gpu-type -- --nats-url=URL`` would connect with URL),
    so a ``--`` here need not end the options; and a secret after a real ``--`` is on the command line all the
    same. No gantry command passes the words after ``--`` to another process or parses them later (they are its
    positional arguments: spec files, model and worker names, counts), so refusing one there costs nothing
    legitimate. ``ops.cli.connect.overrides`` checks the value click parsed as well, whatever form it came in."""
    from shared.envsettings import credentials_on_command_line

    for i, word in enumerate(args):
        flag, eq, inline = word.partition("=")
        if (meant := url_flag(flag)) is None:
            continue
        url = inline if eq else (args[i + 1] if i + 1 < len(args) else None)
        if refused := credentials_on_command_line(flag, url, URL_FLAGS[meant]):
            return refused
    return None


def url_flag(word: str) -> str | None:
    """The URL flag ``word`` names: the flag itself, or a prefix only it starts with (``--nats-u``), as argparse
    reads an abbreviation. Click takes no abbreviation, but a secret typed after one is on the command line all
    the same, and click's usage error would print it back (``Got unexpected extra argument(s) (--nats-u=...)``)."""
    if word in URL_FLAGS:
        return word
    if len(word) <= 2 or not word.startswith("--"):
        return None
    matches = [flag for flag in URL_FLAGS if flag.startswith(word)]
    return matches[0] if len(matches) == 1 else None


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs ``argv`` (``sys.argv[1:]`` when None) and exits with its status."""
    args = sys.argv[1:] if argv is None else list(argv)
    if signal.getsignal(signal.SIGINT) is _interrupted_while_loading:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # from here a Ctrl-C is main's to handle
    try:
        code = run(args)
    except KeyboardInterrupt:
        # Ctrl-C while the command's modules load (a fifth of a second, before any command can take it): quiet,
        # with the exit code of an interrupted command
        code = 130
    sys.exit(code)


def run(args: list[str]) -> int:
    """The exit status of the command line ``args``: the fast path's, else the Typer app's."""
    if refused := secret_on_command_line(args):
        print(f"error: {refused}", file=sys.stderr)
        return 2
    from ops.cli.fast import dispatch

    code = dispatch(args)
    if code is None:
        from ops.cli.app import run_app

        code = run_app(args)
    return code


def __getattr__(name: str) -> Any:
    # The Typer app and its helpers, for callers that knew them here (tests, docs checks); loading them costs
    # the typer import, so only on use.
    if name in ("app", "usage_line", "version", "LazyGroup", "COMMANDS"):
        from ops.cli import app as typer_app

        return getattr(typer_app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
