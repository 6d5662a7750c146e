"""Built-in catalogue: model architectures and GPU specs read from the reference data folder.

Names are matched loosely so users can say ``llama-3.1-8b``, ``meta-llama/Llama-3.1-8B-Instruct`` or
``H100-SXM-80GB``. Files are read once per process.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Protocol

from shared.core.catalog import GpuSpec, ModelArch, arch_from_config, gpu_spec_from_row
from shared.paths import data_dir


class UnknownNameError(KeyError):
    """No catalogue entry matches ``name``; ``message`` says so with the quoting its reader needs."""

    what = "name"

    def __init__(self, name: str, known: str) -> None:
        super().__init__(name)
        self.name, self.known = name, known

    def message(self, quote: Callable[[str], str] = repr) -> str:
        """The error line, ``name`` written by ``quote``: ``repr`` (escaped, for logs) unless the caller escapes the
        whole line itself (the CLI: a repr then would show a backslash doubled twice)."""
        return f"unknown {self.what} {quote(self.name)}: {self.known}"

    def __str__(self) -> str:
        return self.message()


class UnknownModelError(UnknownNameError):
    """No model in the catalogue matches the name."""

    what = "model"


class UnknownGpuError(UnknownNameError):
    """No GPU in the spec table matches the name."""

    what = "GPU"


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


def _model_aliases(key: str, hf_id: str) -> list[str]:
    base = hf_id.split("/")[-1]
    names = [key, hf_id, base]
    for suffix in ("-instruct-hf", "-instruct", "-hf", "-instruct-2407", "-instruct-v0.1", "-v0.1"):
        for name in (key, base):
            if _norm(name).endswith(suffix):
                names.append(_norm(name)[: -len(suffix)])
    if _norm(key).startswith("meta-"):
        names.append(_norm(key)[len("meta-"):])
    return [_norm(n) for n in names]


@cache
def _models() -> tuple[dict[str, ModelArch], dict[str, str]]:
    root = Path(data_dir()) / "model_configs"
    with (root / "model_table.csv").open(newline="") as fh:
        rows = {row["key"]: row for row in csv.DictReader(fh)}
    archs: dict[str, ModelArch] = {}
    aliases: dict[str, str] = {}
    for key, row in sorted(rows.items()):
        cfg = json.loads((root / "hf_configs" / f"{key}.json").read_text())
        archs[key] = arch_from_config(key, cfg, row)
        for alias in _model_aliases(key, row["hf_model_id"]):
            aliases.setdefault(alias, key)
    return archs, aliases


def model_names() -> list[str]:
    """Catalogue keys of every known model."""
    return sorted(_models()[0])


def load_model_arch(name: str) -> ModelArch:
    """The architecture of a catalogue model by key, HF id or a shortened name."""
    archs, aliases = _models()
    key = aliases.get(_norm(name))
    if key is None:
        raise UnknownModelError(name, f"not in the catalogue ({len(archs)} models; e.g. {', '.join(list(archs)[:4])})")
    return archs[key]


def model_archs() -> list[ModelArch]:
    """Every catalogue architecture, by key."""
    archs = _models()[0]
    return [archs[key] for key in sorted(archs)]


class SpecNames(Protocol):
    """The names a model spec offers the catalogue (``ModelSpec`` has them)."""

    @property
    def name(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def catalog_model(self) -> str | None: ...


def resolve_arch(spec: SpecNames) -> ModelArch | None:
    """A spec's architecture: by ``catalog_model`` when set (and only by it), else by the name users know,
    the spec's ``name`` or its ``source`` (a Hugging Face id such as ``Qwen/Qwen3-8B``); None when none is
    in the catalogue."""
    names = (spec.catalog_model,) if spec.catalog_model else (spec.name, spec.source)
    for name in names:
        if name:
            try:
                return load_model_arch(name)
            except UnknownModelError:
                continue
    return None


def _gpu_aliases(spec: GpuSpec) -> list[str]:
    names = [spec.key, spec.name, spec.name.removeprefix("NVIDIA ")]
    gib = round(spec.mem_bytes / (1 << 30))
    names += [f"{spec.key}-{gib}gb", f"{spec.key}-{gib}g"]
    if spec.key.endswith("_sxm"):  # "H100-SXM5-80GB" and "H100-SXM-80GB" are one product; bare "H200" too
        names += [spec.key.replace("_sxm", "_sxm5"), spec.key.removesuffix("_sxm")]
    return [_norm(n.replace("_", "-")) for n in names]


@cache
def _gpus() -> tuple[dict[str, GpuSpec], dict[str, str]]:
    path = Path(data_dir()) / "gpu_specs" / "gpu_specs.csv"
    with path.open(newline="") as fh:
        specs = [gpu_spec_from_row(row) for row in csv.DictReader(fh)]
    by_key: dict[str, GpuSpec] = {}
    aliases: dict[str, str] = {}
    for spec in specs:  # aiconfigurator rows come first and win aliases they share
        by_key[spec.key] = spec
        for alias in _gpu_aliases(spec):
            aliases.setdefault(alias, spec.key)
    return by_key, aliases


def gpu_names() -> list[str]:
    """Keys of every GPU in the spec table."""
    return sorted(_gpus()[0])


def load_gpu_spec(name: str) -> GpuSpec:
    """A GPU's datasheet numbers by key or product name (e.g. ``H100-SXM-80GB``)."""
    specs, aliases = _gpus()
    key = aliases.get(_norm(name))
    if key is None:
        raise UnknownGpuError(name, f"not in the spec table ({', '.join(sorted(specs)[:6])}, ...)")
    return specs[key]
