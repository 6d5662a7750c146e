"""single: one profile decides (GIE ``single-profile-handler``)."""

from __future__ import annotations

import msgspec

from shared.core.routing.cycle import Cycle
from shared.core.routing.domain import EndpointState
from shared.core.routing.handlers.base import Handler, HandlerOutcome
from shared.core.routing.profile import Profile


class SingleParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``profile``: the acting profile (default: the first declared)."""

    profile: str = ""


class SingleHandler(Handler):
    """Runs one profile."""

    type_name = "single"
    Params = SingleParams

    @classmethod
    def check(cls, params: msgspec.Struct, profiles: dict[str, Profile]) -> list[str]:
        """The named profile must exist."""
        assert isinstance(params, SingleParams)
        if params.profile and params.profile not in profiles:
            return [f"no profile named {params.profile!r}"]
        return []

    def __init__(self, params: msgspec.Struct, profiles: dict[str, Profile]) -> None:
        super().__init__(params, profiles)
        assert isinstance(params, SingleParams)
        self.profile = profiles[params.profile] if params.profile else next(iter(profiles.values()))

    def run(self, cycle: Cycle, pool: list[EndpointState], explain: bool) -> HandlerOutcome:
        """The profile's result."""
        p = self.profile
        return HandlerOutcome({p.name: p.run(cycle, pool, explain)}, p.name)
