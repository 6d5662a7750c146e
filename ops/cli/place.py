"""``gantry place``: a placement dry run over a scenario file (like ``nomad job plan``).

Places N replicas one after another, each seeing the ones before, and prints one JSON document with the
decision (or the unschedulable verdict and its reasons) per replica. Nothing is committed anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer

from ops.cli.common import whole
from ops.cli.errors import CliError, quoted
from ops.cli.inputs import MAX_SCENARIO_BYTES, read_input_file
from shared.catalog import resolve_arch
from shared.core.catalog.models import ModelArch
from shared.core.limits import MAX_REPLICAS
from shared.core.placement import DEFAULT_PROFILE, Profile, place, profile_from_json, profile_from_yaml
from shared.core.placement.domain import Decision, GgufSpec, ModelSpec, Reason
from shared.core.placement.gguf_header import gguf_spec_from_reader
from shared.core.placement.lifecycle import instance_from_decision
from shared.core.placement.pipeline import requirements
from shared.core.placement.requirements import gib
from shared.core.placement.scenario import Scenario, ScenarioError, load_scenario


def register(app: typer.Typer) -> None:
    """Add ``place``."""
    app.command("place")(place_cmd)


def _arch(model: ModelSpec) -> ModelArch | None:
    """The architecture placement itself would use (``shared.catalog.resolve_arch``)."""
    arch = resolve_arch(model)
    if model.catalog_model and arch is None:
        raise CliError(f"catalog_model {quoted(model.catalog_model)} is not in the model catalogue", exit_code=2)
    return arch


def _gguf(model: ModelSpec, base: Path) -> GgufSpec | None:
    """Per-layer sizes from the model's GGUF file header, when the file exists."""
    if model.gguf is not None or not model.source.lower().endswith(".gguf"):
        return None
    path = Path(model.source)
    if not path.is_absolute():
        path = base / path
    if not path.is_file():
        return None
    from gguf import GGUFReader

    try:
        return gguf_spec_from_reader(GGUFReader(path))
    except Exception as err:  # a parser of untrusted bytes (IndexError, KeyError, struct.error...): unreadable
        raise CliError(f"cannot read GGUF header of {path}: {err}", exit_code=2) from None


def _profile(path: Path | None, scenario: Scenario) -> Profile:
    if path is None:
        return scenario.profile or DEFAULT_PROFILE
    text = read_input_file(path, "profile")
    try:
        return profile_from_yaml(text) if path.suffix in (".yaml", ".yml") else profile_from_json(text)
    except ValueError as err:
        raise CliError(f"{path}: {err}", exit_code=2) from None


def _decision_doc(number: int, d: Decision) -> dict[str, Any]:
    c = d.candidate
    where = f"{c.worker} gpu {list(c.gpu_indexes)}" if c.gpu_indexes else f"{c.worker} (CPU)"
    for s in c.subordinates:
        where += f" + {s.worker} gpu {list(s.gpu_indexes)}"
    claims = ", ".join(f"{gib(v)}" for v in c.vram_claims)
    summary = f"{where}: VRAM [{claims}] GiB, RAM {gib(c.ram_claim)} GiB, score {d.score:.2f} via {c.strategy}"
    if c.offload_layers is not None:
        summary += f", {c.offload_layers}/{c.total_layers} layers on GPU"
    doc: dict[str, Any] = {"replica": number, "placed": True, "summary": summary}
    doc.update(msgspec.to_builtins(c))
    doc.update(
        score=d.score,
        breakdown=d.breakdown,
        candidates_considered=d.candidates_considered,
        filters=[f"{r.filter} kept {r.kept} of {r.total}" for r in d.filters],
    )
    return doc


def place_cmd(
    scenario: Annotated[Path, typer.Option("--scenario", help="scenario JSON file (see docs/placement.md)")],
    replicas: Annotated[
        int | None,
        whole(1, MAX_REPLICAS, help="replicas to place (default: the scenario's)"),
    ] = None,
    profile: Annotated[Path | None, typer.Option("--profile", help="profile JSON/YAML file")] = None,
    exhaustive: Annotated[
        bool, typer.Option("--exhaustive", help="use the reference path (every worker and GPU visited)")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the full decision document as JSON")] = False,
) -> None:
    """Dry-run placement: place replicas one after another and print where each went, or why not."""
    data = read_input_file(scenario, "scenario", MAX_SCENARIO_BYTES)
    try:
        sc = load_scenario(data)
    except ScenarioError as err:
        raise CliError(f"{scenario}: {err}", exit_code=2) from None
    prof = _profile(profile, sc)
    model = sc.model
    arch = _arch(model)
    gguf = _gguf(model, scenario.parent)
    request = requirements(model, arch, gguf)
    count = replicas or sc.replicas or model.replicas or 1
    snap = sc.snapshot()
    now = sc.clock
    out: list[dict[str, Any]] = []
    placed = 0
    for number in range(1, count + 1):
        if isinstance(request, Reason):
            out.append({"replica": number, "placed": False, "message": request.message,
                        "reasons": [msgspec.to_builtins(request)]})
            continue
        result = place(snap, model, now, prof, request=request, exhaustive=exhaustive)
        if isinstance(result, Decision):
            placed += 1
            out.append(_decision_doc(number, result))
            snap.upsert_instance(instance_from_decision(result, f"{model.name}-dry-run-{number}", created_at=now))
        else:
            doc = {"replica": number, "placed": False}
            doc.update(msgspec.to_builtins(result))
            doc.pop("model", None)
            out.append(doc)
    document = {
        "scenario": sc.description or scenario.name,
        "model": model.name,
        "now": now,
        "profile": prof.name,
        "request": None if isinstance(request, Reason) else msgspec.to_builtins(request),
        "placed": placed,
        "unschedulable": count - placed,
        "replicas": out,
    }
    if json_out:
        typer.echo(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        typer.echo("\n".join(human_lines(document)))


def human_lines(document: dict[str, Any], reasons_shown: int = 5) -> list[str]:
    """The dry run in words: what one replica needs, then one line per replica (where, or why not)."""
    lines = [f"model {document['model']}, profile {document['profile']} ({document['scenario']})"]
    request = document["request"]
    if request is not None:
        gpus = request.get("gpu_count") or 1
        lines.append(f"each replica needs {gib(request['vram'])} GiB VRAM on {gpus} GPU(s), "
                     f"RAM {gib(request['ram'])} GiB")
    for doc in document["replicas"]:
        if doc["placed"]:
            lines.append(f"replica {doc['replica']}: {doc['summary']}")
            continue
        lines.append(f"replica {doc['replica']}: unschedulable: {doc.get('message', '')}")
        for f in doc.get("filters", []):
            if f["kept"] < f["total"]:
                lines.append(f"  filter {f['filter']} kept {f['kept']} of {f['total']}")
        reasons = doc.get("reasons", [])
        for r in reasons[:reasons_shown]:
            lines.append(f"  {r['plugin']} {r['subject'] or '(request)'}: {r['message']}")
        if len(reasons) > reasons_shown:
            lines.append(f"  ... {len(reasons) - reasons_shown} more (--json shows all)")
    total = document["placed"] + document["unschedulable"]
    lines.append(f"placed {document['placed']} of {total}; nothing committed (dry run)")
    return lines
