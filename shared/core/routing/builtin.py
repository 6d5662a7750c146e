"""Built-in router configurations shipped as YAML beside this module (``profiles/*.yaml``).

Reading package data at configuration time only; decisions never touch files.
"""

from __future__ import annotations

from importlib import resources

from shared.core.routing.profile import RouterConfig, decode_config


def builtin_names() -> list[str]:
    """Names of the shipped configurations."""
    folder = resources.files("shared.core.routing") / "profiles"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def builtin_config(name: str) -> RouterConfig:
    """A shipped configuration by name; raises ValueError naming the known ones."""
    if name not in builtin_names():
        raise ValueError(f"unknown router profile {name!r}; known: {', '.join(builtin_names())}")
    text = (resources.files("shared.core.routing") / "profiles" / f"{name}.yaml").read_text()
    return decode_config(text)
