"""docs/top.txt shows the demo it says it shows (issue 17: it showed DESIRED 3 for a demo of 2)."""

from __future__ import annotations

from ops.cli.client import load_spec
from shared.paths import REPO_ROOT

SAMPLE = REPO_ROOT / "docs" / "top.txt"
DEMO = sorted((REPO_ROOT / "ops" / "demo").glob("*.yaml"))


def models_rows(text: str) -> dict[str, tuple[int, int]]:
    """MODEL -> (DESIRED, RUNNING) from the models table of a `gantry top` frame."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "DESIRED" in line)
    rows: dict[str, tuple[int, int]] = {}
    for line in lines[start + 2:]:
        if not line.startswith("│"):
            break
        cells = [c.strip() for c in line.strip("│").split("│")]
        rows[cells[0]] = (int(cells[1]), int(cells[2]))
    return rows


def test_the_top_sample_is_of_the_demo_command() -> None:
    assert SAMPLE.read_text().startswith("$ gantry up --workers 4 --demo")


def test_the_top_sample_desires_what_the_demo_specs_ask_for_and_runs_it() -> None:
    specs = {spec.name: spec.replicas for spec in map(load_spec, DEMO)}
    assert specs and all(n is not None for n in specs.values())
    assert models_rows(SAMPLE.read_text()) == {name: (n, n) for name, n in specs.items()}
