"""Placement profiles: which filters, fit strategies and scorers run, in which order, with which weights.

A profile is plain data (JSON or YAML); plugin names refer to the registries in ``filters``, ``fitting``,
``scorers`` and ``scaledown``. Plugin parameters are typed (each plugin's ``Args`` struct): scorers take
``args`` in their ``ScorerConfig``, filters and fit strategies in ``filter_args`` / ``fit_args`` by name.
``validate_profile`` rejects unknown names and invalid arguments with one clear message.
"""

from __future__ import annotations

from typing import Any

import msgspec


class ScorerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One enabled scorer: its contribution is ``raw × weight``, rescaled to ``max_score`` when set."""

    name: str
    weight: float = 1.0
    max_score: float | None = None  # rescale the scorer's natural maximum to this value
    args: dict[str, Any] = {}  # the scorer's typed parameters (its ``Args`` struct), checked on load


DEFAULT_FILTERS: tuple[str, ...] = ("cluster", "gpu_selector", "labels", "status", "backend", "local_path")
DEFAULT_FIT_STRATEGIES: tuple[str, ...] = (
    "manual",
    "single_gpu",
    "multi_gpu",
    "multi_worker",
    "partial_offload",
    "cpu_only",
)
DEFAULT_SCORERS: tuple[ScorerConfig, ...] = (
    ScorerConfig(name="placement"),
    ScorerConfig(name="locality"),
    ScorerConfig(name="worker_fill"),
)
DEFAULT_SCALE_DOWN: tuple[ScorerConfig, ...] = (
    ScorerConfig(name="status"),
    ScorerConfig(name="offload_layers"),
    ScorerConfig(name="placement"),
)
# Which device vendors each backend runs on ("cpu": workers without GPUs, or with CPU offloading).
DEFAULT_BACKEND_SUPPORT: dict[str, tuple[str, ...]] = {
    "vllm": ("cuda", "rocm"),
    "sglang": ("cuda", "rocm"),
    "llama-cpp": ("cuda", "rocm", "metal", "cpu"),
    "custom": ("cuda", "rocm", "metal", "cpu"),
}


class Profile(msgspec.Struct, frozen=True, kw_only=True):
    """The plugin chains placement runs, and their settings."""

    name: str = "default"
    filters: tuple[str, ...] = DEFAULT_FILTERS
    fit_strategies: tuple[str, ...] = DEFAULT_FIT_STRATEGIES
    scorers: tuple[ScorerConfig, ...] = DEFAULT_SCORERS
    scale_down_scorers: tuple[ScorerConfig, ...] = DEFAULT_SCALE_DOWN
    backend_support: dict[str, tuple[str, ...]] = msgspec.field(
        default_factory=lambda: dict(DEFAULT_BACKEND_SUPPORT)
    )
    max_worker_combinations: int = 64  # multi-worker candidates kept per GPU group, in name order
    # backend → vendor → lowest GPU runtime version it runs on (e.g. {"vllm": {"cuda": "12.1"}})
    min_runtime_version: dict[str, dict[str, str]] = {}
    filter_args: dict[str, dict[str, Any]] = {}  # filter name → its typed parameters
    fit_args: dict[str, dict[str, Any]] = {}  # fit strategy name → its typed parameters


DEFAULT_PROFILE = Profile()


def validate_profile(profile: Profile) -> Profile:
    """Return ``profile`` if every plugin name is registered; raise ValueError naming the unknown ones."""
    from shared.core.placement.filters import FILTERS
    from shared.core.placement.fitting import FIT_STRATEGIES
    from shared.core.placement.scaledown import SCALE_DOWN_SCORERS
    from shared.core.placement.scorers import SCORERS

    problems = []
    chains: tuple[tuple[str, list[tuple[str, dict[str, Any]]], dict[str, Any]], ...] = (
        ("filter", [(n, profile.filter_args.get(n, {})) for n in profile.filters], FILTERS),
        ("fit strategy", [(n, profile.fit_args.get(n, {})) for n in profile.fit_strategies], FIT_STRATEGIES),
        ("scorer", [(s.name, s.args) for s in profile.scorers], SCORERS),
        ("scale-down scorer", [(s.name, s.args) for s in profile.scale_down_scorers], SCALE_DOWN_SCORERS),
    )
    for kind, configured, registry in chains:
        for n, args in configured:
            if n not in registry:
                problems.append(f"unknown {kind} {n!r} (known: {', '.join(sorted(registry))})")
                continue
            try:
                registry[n].decode(args, kind)
            except ValueError as err:
                problems.append(str(err))
    for kind, given, chain in (("filter", profile.filter_args, profile.filters),
                               ("fit strategy", profile.fit_args, profile.fit_strategies)):
        problems += [f"args for {kind} {n!r}, which the profile does not run" for n in sorted(given) if n not in chain]
    if profile.max_worker_combinations < 1:
        problems.append("max_worker_combinations must be at least 1")
    if problems:
        raise ValueError(f"profile {profile.name!r}: " + "; ".join(problems))
    return profile


def _decode(data: bytes | str, fmt: str) -> Profile:
    decode = msgspec.json.decode if fmt == "JSON" else msgspec.yaml.decode
    try:
        return validate_profile(decode(data, type=Profile))
    except msgspec.ValidationError as err:
        raise ValueError(f"invalid profile: {err}") from None
    except msgspec.DecodeError as err:
        raise ValueError(f"profile is not valid {fmt}: {err}") from None


def profile_from_json(data: bytes | str) -> Profile:
    """Decode and validate a JSON profile; raises ValueError on bad input."""
    return _decode(data, "JSON")


def profile_from_yaml(data: bytes | str) -> Profile:
    """Decode and validate a YAML profile; raises ValueError on bad input."""
    return _decode(data, "YAML")
