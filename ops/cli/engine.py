"""``gantry engine replay`` (step-by-step scheduler replay) and ``gantry simulate`` (virtual-time cluster)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ops.cli.errors import CliError
from ops.cli.inputs import MAX_SCENARIO_BYTES, read_input_file
from shared.core.engine.replay import ScenarioError, parse_scenario, replay

engine_app = typer.Typer(help="The emulated inference engine: scheduler replay and tools.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add ``engine`` (with ``replay``) and ``simulate``."""
    app.add_typer(engine_app, name="engine")
    from ops.cli.simulate import simulate

    app.command("simulate")(simulate)


@engine_app.command("replay")
def replay_cmd(
    scenario: Annotated[Path, typer.Option("--scenario", help="scenario JSON file (see docs/engine.md)")],
) -> None:
    """Replay a scenario through the scheduler; print one JSON line per step."""
    data = read_input_file(scenario, "scenario", MAX_SCENARIO_BYTES)
    try:
        sc = parse_scenario(data)
        for record in replay(sc):
            typer.echo(json.dumps(record, separators=(", ", ": ")))
    except ScenarioError as err:
        raise CliError(f"{scenario}: {err}", exit_code=2) from None
