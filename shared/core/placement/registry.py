"""The plugin registries of every kind, and loading a profile checked against them.

Above the plugins in the import order (plugins read ``profile``, the plain data; this module reads the
plugins), so no plugin module ever needs a function-level import to reach a registry.
"""

from __future__ import annotations

from typing import Any

import msgspec

from shared.core import strict_yaml
from shared.core.placement.filters import FILTERS
from shared.core.placement.fitting import FIT_STRATEGIES
from shared.core.placement.profile import MAX_WEIGHT, Profile
from shared.core.placement.scaledown import SCALE_DOWN_SCORERS
from shared.core.placement.scorers import SCORERS

__all__ = [
    "FILTERS",
    "FIT_STRATEGIES",
    "SCALE_DOWN_SCORERS",
    "SCORERS",
    "profile_from_json",
    "profile_from_yaml",
    "validate_profile",
]


def validate_profile(profile: Profile) -> Profile:
    """Return ``profile`` if every plugin name is registered and every plugin's args decode into its typed
    ``Args``; raise ValueError naming every problem."""
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
    for sc in (*profile.scorers, *profile.scale_down_scorers):  # (a profile built in Python skips decode's bounds)
        if not abs(sc.weight) <= MAX_WEIGHT or (sc.max_score is not None and not 0 < sc.max_score <= MAX_WEIGHT):
            problems.append(f"scorer {sc.name!r}: weight and max_score must be finite, |weight| <= {MAX_WEIGHT:g} "
                            f"and 0 < max_score <= {MAX_WEIGHT:g}")
    if problems:
        raise ValueError(f"profile {profile.name!r}: " + "; ".join(problems))
    return profile


def _decode(data: bytes | str, fmt: str) -> Profile:
    decode = msgspec.json.decode if fmt == "JSON" else strict_yaml.decode
    try:
        return validate_profile(decode(data, type=Profile))
    except msgspec.ValidationError as err:
        raise ValueError(f"invalid profile: {err}") from None
    except msgspec.DecodeError as err:  # YAML parsers explain on several lines: the CLI prints one
        raise ValueError(f"profile is not valid {fmt}: {' '.join(str(err).split())}") from None
    except RecursionError:
        raise ValueError(f"profile is not valid {fmt}: nested too deeply") from None


def profile_from_json(data: bytes | str) -> Profile:
    """Decode and validate a JSON profile; raises ValueError on bad input."""
    return _decode(data, "JSON")


def profile_from_yaml(data: bytes | str) -> Profile:
    """Decode and validate a YAML profile; raises ValueError on bad input."""
    return _decode(data, "YAML")
