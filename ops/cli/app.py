"""The ``gantry`` command line as one Typer app, one module per command group, each loaded only when used.

``COMMANDS`` names every command and the module whose ``register(app)`` adds it; a call
imports that one module, so ``gantry deploy`` never pays for the simulator, the web view or the stack launcher.
Errors the user can act on, usage mistakes included, are printed as one line (``error: ...``) with a non-zero
exit code, never as a traceback or a box.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from typer._click import core as click
from typer._click import exceptions as click_errors
from typer.core import TyperGroup

from ops.cli.errors import CliError, escaped
from ops.cli.output import echo

# command -> module under ops/cli that registers it (a module may register several commands)
COMMANDS: dict[str, str] = {
    "up": "stack", "down": "stack", "status": "status",
    "deploy": "cluster", "scale": "cluster", "delete": "cluster", "models": "cluster", "instances": "cluster",
    "workers": "cluster", "explain": "cluster", "cordon": "cluster", "uncordon": "cluster", "events": "cluster",
    "catalog": "catalog",
    "top": "top",
    "place": "place",
    "engine": "engine", "simulate": "engine",
    "gateway": "gateway",
}


class LazyGroup(TyperGroup):
    """A command group that imports a command's module the first time the command is looked up."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every command, in the order of ``COMMANDS`` (the help page's order)."""
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command, building its module's commands on first use."""
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            self._load(COMMANDS[cmd_name])
        return self.commands.get(cmd_name)

    def _load(self, module: str) -> None:
        sub = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
        importlib.import_module(f"ops.cli.{module}").register(sub)
        built = typer.main.get_group(sub)
        for name, command in built.commands.items():
            self.commands.setdefault(name, command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gantry {version()}")
        raise typer.Exit()


def version() -> str:
    """The installed package's version (the source tree's when run from a checkout)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("gantry")
    except PackageNotFoundError:
        import tomllib

        from shared.paths import REPO_ROOT

        return str(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"])


app = typer.Typer(
    name="gantry",
    cls=LazyGroup,
    help="Gantry: placement and request scheduling for LLM inference clusters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def _root(
    show_version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_version, help="print the version and exit")
    ] = False,
) -> None:
    """Gantry: placement and request scheduling for LLM inference clusters."""


def usage_line(err: click_errors.UsageError, argv: Sequence[str] = ()) -> str:
    """A usage mistake as one line: click's message plus where to read the command's options (the command named
    first in ``argv`` when click's error has no context, as for an option missing its value)."""
    if err.ctx is not None:
        where = err.ctx.command_path
    else:
        where = "gantry" + (f" {argv[0]}" if argv and argv[0] in COMMANDS else "")
    return f"error: {click_message(err)} (see `{where} --help`)"


def click_message(err: click_errors.ClickException) -> str:
    """Click's message as one safe line: it quotes what the user typed (an option, an extra argument) as is, so
    it is escaped like every other error line (``ops.cli.errors.escaped``): a newline shows as ``\\n``, a bidi
    override as ``\\u202e``."""
    return escaped(err.format_message().strip())


def run_app(argv: list[str] | None) -> int:
    """Run the Typer app on ``argv`` (``sys.argv[1:]`` when None); its exit status. Errors are printed here."""
    try:
        code: Any = app(args=argv, prog_name="gantry", standalone_mode=False)
    except CliError as err:
        echo(f"error: {err}", err=True)
        return err.exit_code
    except click_errors.NoArgsIsHelpError as err:
        # `gantry` or `gantry engine` alone: the help page, as --help shows it. Click makes it a usage error whose
        # message is the page (one escaped line here, `\n` and all); typer's boxed page prints itself and leaves
        # the message empty.
        if page := err.format_message().strip():
            echo(page)
        return err.exit_code
    except click_errors.UsageError as err:
        echo(usage_line(err, argv or ()), err=True)
        return err.exit_code
    except click_errors.ClickException as err:
        echo(f"error: {click_message(err)}", err=True)
        return err.exit_code
    except typer.Abort:
        echo("aborted", err=True)
        return 130
    return code if isinstance(code, int) else 0  # like click's standalone mode: always an exit status
