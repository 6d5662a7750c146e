"""``gantry catalog``: the models Gantry can size without a ``weight_bytes`` or a claim in the spec.

A spec resolves to one of these by ``catalog_model``, by its ``name`` or by its ``source`` (the Hugging Face
id, e.g. ``Qwen/Qwen3-8B``), see ``shared.catalog.resolve_arch``.
"""

from __future__ import annotations

from typing import Annotated

import typer

from ops.cli.common import JsonFlag, console, print_json


def register(app: typer.Typer) -> None:
    """Add ``catalog``."""
    app.command("catalog")(catalog)


def catalog(
    match: Annotated[str | None, typer.Argument(help="only entries whose key or HF id contains this")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Models Gantry can size: use the KEY as `catalog_model`, or the HF ID as `source`, in a model spec."""
    from rich.table import Table

    from shared.catalog import model_archs

    needle = (match or "")[:200].lower()
    archs = [a for a in model_archs() if needle in a.key.lower() or needle in a.hf_model_id.lower()]
    if json_out:
        print_json([
            {"key": a.key, "hf_model_id": a.hf_model_id, "params": a.params_total, "active_params": a.params_active,
             "layers": a.num_layers, "kv_bytes_per_token_bf16": a.kv_bytes_per_token_bf16}
            for a in archs
        ])
        return
    if not archs:
        text = match or ""  # shown cut short: a 100,000-character argument was echoed back whole
        shown = repr(text) if len(text) <= 80 else f"{text[:80]!r}... ({len(text)} characters)"
        typer.echo(f"no catalogue model matches {shown}; `gantry catalog` lists all")
        return
    table = Table()
    for column in ("KEY", "HF ID (source)", "PARAMS", "LAYERS", "KV KiB/TOKEN"):
        table.add_column(column, no_wrap=True, justify="right" if column in ("PARAMS", "LAYERS", "KV KiB/TOKEN")
                         else "left")
    for a in archs:
        active = f" ({a.params_active / 1e9:.1f}B active)" if a.params_active != a.params_total else ""
        table.add_row(a.key, a.hf_model_id, f"{a.params_total / 1e9:.1f}B{active}", str(a.num_layers),
                      f"{a.kv_bytes_per_token_bf16 / 1024:g}")
    console().print(table)
    typer.echo("in a model spec: `catalog_model: KEY`, or `source: HF ID` (any `name`)")
