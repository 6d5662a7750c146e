"""The ``gantry`` command line: one Typer app, one module per command group.

Each module in ``COMMAND_MODULES`` exposes ``register(app)``. Errors the user can act on are raised as
``CliError`` and printed as one line with a non-zero exit code, never as a traceback.
"""

from __future__ import annotations

import importlib
import sys

import typer

from ops.cli.errors import CliError

COMMAND_MODULES: tuple[str, ...] = (
    "engine",
    "stack",
    "cluster",
    "top",
    "place",
    "gateway",
)

app = typer.Typer(
    name="gantry",
    help="Gantry: placement and request scheduling for LLM inference clusters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"ops.cli.{name}").register(app)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        app(args=argv, prog_name="gantry", standalone_mode=True)
    except CliError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
