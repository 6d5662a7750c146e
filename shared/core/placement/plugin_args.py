"""Typed plugin parameters: every filter, fit strategy and scorer declares its arguments as a struct.

A profile carries each plugin's arguments as plain data (``args``); ``decode`` turns them into the plugin's
``Args`` struct when the profile loads, so a misspelt name, a wrong type or an out-of-range value is one
clear error then, not a surprise at the first placement (kube-scheduler's typed plugin args, llm-d's
plugin parameters). Plugins without parameters use ``NoArgs``, which rejects any key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Self

import msgspec


class NoArgs(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The arguments of a plugin that takes none."""


def _key(raw: Mapping[str, Any]) -> bytes:
    return msgspec.json.encode(raw, order="sorted")


class Configurable:
    """Mixin for plugin classes: ``Args`` declares the parameters, ``configured`` builds a configured plugin.

    Plugins are stateless apart from their arguments, so one instance per (class, arguments) is kept.
    """

    name: ClassVar[str]
    Args: ClassVar[type[msgspec.Struct]] = NoArgs
    _made: ClassVar[dict[tuple[type, bytes], Any]] = {}

    def __init__(self, args: msgspec.Struct | None = None) -> None:
        self.args = args if args is not None else self.Args()

    @classmethod
    def decode(cls, raw: Mapping[str, Any] | None, kind: str) -> msgspec.Struct:
        """The typed arguments, or ValueError naming the plugin and the problem."""
        try:
            return msgspec.convert(dict(raw or {}), type=cls.Args)
        except msgspec.ValidationError as err:
            raise ValueError(f"{kind} {cls.name!r}: invalid args: {err}") from None

    @classmethod
    def configured(cls, raw: Mapping[str, Any] | None = None, kind: str = "plugin") -> Self:
        """The plugin with these arguments (validated; built once per distinct arguments)."""
        key = (cls, _key(raw) if raw else b"")
        made = Configurable._made.get(key)
        if made is None:
            made = Configurable._made[key] = cls(cls.decode(raw, kind))
        return made
