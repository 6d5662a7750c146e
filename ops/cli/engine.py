"""``gantry engine replay`` (step-by-step scheduler replay) and ``gantry simulate`` (virtual-time cluster)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ops.cli.common import whole
from ops.cli.errors import CliError
from ops.cli.inputs import MAX_SCENARIO_BYTES, read_input_file
from ops.vllm_reference import TINY_MODEL
from shared.core.engine.replay import ScenarioError, parse_scenario, replay
from shared.core.engine.scenarios import first_divergence, random_scenario

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


@engine_app.command("random-scenario")
def random_scenario_cmd(
    seed: Annotated[int, whole(help="the scenario is a function of this seed")] = 0,
) -> None:
    """Print the seeded random scenario the differential harness uses (replay's schema)."""
    import msgspec

    typer.echo(msgspec.json.encode(random_scenario(seed)).decode())


@engine_app.command("diff-vllm")
def diff_vllm_cmd(
    seeds: Annotated[int, whole(1, help="how many random scenarios")] = 200,
    first_seed: Annotated[int, whole(help="seed of the first scenario")] = 0,
    model: Annotated[str, typer.Option("--model", help="model whose config vLLM loads (default: a tiny local one)")] = (
        TINY_MODEL
    ),
) -> None:
    """Replay seeded random scenarios through Gantry's and vLLM's schedulers; report where they differ.

    Needs a CPU-only vLLM install (not a Gantry dependency). The last line is a JSON summary.
    """
    from ops.vllm_reference import VllmReplayer, vllm_missing

    missing = vllm_missing()
    if missing:
        raise CliError(missing, exit_code=1)
    agree = 0
    by_field: dict[str, int] = {}
    divergences: list[dict[str, object]] = []
    for seed in range(first_seed, first_seed + seeds):
        sc = random_scenario(seed)
        try:
            theirs = list(VllmReplayer(sc, model).replay())
        except RuntimeError as err:
            raise CliError(str(err)) from None
        d = first_divergence(replay(sc), theirs)
        if d is None:
            agree += 1
            continue
        by_field[d.field] = by_field.get(d.field, 0) + 1
        divergences.append({"seed": seed, "where": d.describe()})
        typer.echo(f"seed {seed}: {d.describe()}")
    summary = {"seeds": seeds, "agree": agree, "agreement": agree / seeds, "first_divergence_by_field": by_field,
               "divergences": divergences[:50]}
    typer.echo(json.dumps(summary))
