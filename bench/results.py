"""Where a benchmark keeps its result: ``docs/benchmarks/NAME.json`` and ``NAME.png``, side by side."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"


def save(name: str, data: Mapping[str, Any], draw: Callable[[Path], None]) -> None:
    """Write ``data`` to ``docs/benchmarks/NAME.json`` and have ``draw`` render ``NAME.png`` beside it."""
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    draw(OUT / f"{name}.png")
