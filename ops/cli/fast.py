"""The read commands without typer: `gantry models|workers|instances|explain` with plain options (issue 17).

Typer (with its pydantic-based parameter handling) costs a third of a read command's 0.6 s. Here a command line
is read only when its meaning is beyond doubt: the command name first, then the command's own options spelt
out (``--json``, ``--all``, ``--model X`` or ``-m X``, ``--model=X``, ``--nats-url``/``--redis-url`` the same
ways; a repeated option keeps its last value, as click does) and its one argument (explain's model). Anything
else, ``--help``, a value that looks like an option, a ``--``, an unknown or misspelt option, a missing or
extra argument, returns None and the Typer app reads the line: help, usage errors and their exit codes come
from one place. The commands themselves are ``ops.cli.reads``, the functions the Typer app calls too.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from ops.cli.errors import CliError, Interrupted
from ops.cli.output import echo

URL_OPTIONS = {"--nats-url": "nats_url", "--redis-url": "redis_url"}


class Syntax(NamedTuple):
    """What one read command accepts: flags, options that take a value, and its positional arguments."""

    run: str  # the function of ops.cli.reads
    flags: dict[str, str]  # option -> parameter set to True
    values: dict[str, str]  # option -> parameter that takes the next word
    arguments: tuple[str, ...] = ()  # parameters filled, in order, by the words that are not options


JSON = {"--json": "json_out"}
SYNTAX: dict[str, Syntax] = {
    "models": Syntax("models", flags={**JSON, "--all": "show_all"}, values=URL_OPTIONS),
    "workers": Syntax("workers", flags=JSON, values=URL_OPTIONS),
    "instances": Syntax("instances", flags=JSON, values={**URL_OPTIONS, "--model": "model", "-m": "model"}),
    "explain": Syntax("explain", flags=JSON, values=URL_OPTIONS, arguments=("model",)),
}
DEFAULTS: dict[str, Any] = {"json_out": False, "show_all": False, "model": None, "nats_url": None, "redis_url": None}


def parse(argv: Sequence[str]) -> tuple[str, dict[str, Any]] | None:
    """(function name, keyword arguments) of a read command line read exactly as typer reads it; None if the
    line is anything else or anything less plain."""
    if not argv or argv[0] not in SYNTAX:
        return None
    syntax = SYNTAX[argv[0]]
    params: dict[str, Any] = {
        name: DEFAULTS[name] for name in (*syntax.flags.values(), *syntax.values.values(), *syntax.arguments)
    }
    positional: list[str] = []
    words = list(argv[1:])
    while words:
        word = words.pop(0)
        name, eq, inline = word.partition("=")
        if word in syntax.flags:
            params[syntax.flags[word]] = True
        elif word in syntax.values:
            if not words or words[0].startswith("-"):
                return None  # a missing value, or one click might read as an option: its error, not ours
            params[syntax.values[word]] = words.pop(0)
        elif eq and name.startswith("--") and name in syntax.values:
            params[syntax.values[name]] = inline
        elif word.startswith("-"):
            return None
        else:
            positional.append(word)
    if len(positional) != len(syntax.arguments):
        return None
    params.update(zip(syntax.arguments, positional, strict=True))
    return syntax.run, params


def dispatch(argv: Sequence[str]) -> int | None:
    """Run a plain read command line; its exit status, or None when ``argv`` is for the Typer app."""
    parsed = parse(argv)
    if parsed is None:
        return None
    from ops.cli import reads

    function, params = parsed
    command: Callable[..., None] = getattr(reads, function)
    return run(lambda: command(**params))


def run(command: Callable[[], None]) -> int:
    """Run ``command`` with the Typer app's outcomes: a CliError is one line and its exit code, Ctrl-C exits 130
    quietly, a reader that went away (``| head``) exits 1 without a traceback."""
    try:
        command()
    except CliError as err:
        echo(f"error: {err}", err=True)
        return err.exit_code
    except (Interrupted, KeyboardInterrupt):
        return 130
    except OSError as err:
        if err.errno != errno.EPIPE:
            raise
        _silence_output()
        return 1
    return 0


def _silence_output() -> None:
    # The reader closed the pipe: what is still buffered must not fail again (and print a traceback) at exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError, AttributeError):  # a stream without a descriptor (captured output)
            continue
    os.close(devnull)
