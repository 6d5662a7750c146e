"""The profile-handler interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import msgspec

from shared.core.routing.cycle import Cycle
from shared.core.routing.domain import EndpointState, ProfileResult
from shared.core.routing.profile import Profile


@dataclass(frozen=True, slots=True)
class HandlerOutcome:
    """Results of the acting profiles; ``primary`` names the one whose pick receives the request, ``prefill``
    the one whose pick prefills it (P/D), if any."""

    results: dict[str, ProfileResult]
    primary: str
    prefill: str | None = None


class Handler(ABC):
    """Runs the profiles of a request."""

    type_name: ClassVar[str]
    Params: ClassVar[type[msgspec.Struct]]

    def __init__(self, params: msgspec.Struct, profiles: dict[str, Profile]) -> None:
        self.params = params
        self.profiles = profiles

    @classmethod
    def build(cls, raw: dict[str, Any], profiles: dict[str, Profile]) -> tuple[Handler | None, list[str]]:
        """Typed parameters and the profiles they name, or the problems."""
        try:
            params = msgspec.convert(raw, cls.Params)
        except msgspec.ValidationError as err:
            return None, [f"handler {cls.type_name!r}: {err}"]
        problems = [f"handler {cls.type_name!r}: {p}" for p in cls.check(params, profiles)]
        return (None if problems else cls(params, profiles)), problems

    @classmethod
    def check(cls, params: msgspec.Struct, profiles: dict[str, Profile]) -> list[str]:
        """Problems of ``params`` against the declared profiles."""
        return []

    @abstractmethod
    def run(self, cycle: Cycle, pool: list[EndpointState], explain: bool) -> HandlerOutcome:
        """Run the profiles this request needs."""
