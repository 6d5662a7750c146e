"""role-filter: keeps endpoints that run the phase a profile places (prefill or decode, ``NodeRole``)."""

from __future__ import annotations

from typing import Literal

import msgspec

from shared.core.routing.cycle import Cycle
from shared.core.routing.domain import EndpointState
from shared.core.routing.plugin import Filter


class RoleParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``phase``: the phase the profile places; mixed endpoints run both."""

    phase: Literal["prefill", "decode"] = "decode"


class RoleFilter(Filter):
    """Drops endpoints whose role does not run the profile's phase."""

    type_name = "role-filter"
    Params = RoleParams

    def filter(self, cycle: Cycle, cands: list[EndpointState]) -> list[EndpointState]:
        """Keep prefill-capable (or decode-capable) endpoints."""
        assert isinstance(self.params, RoleParams)
        if self.params.phase == "prefill":
            return [st for st in cands if st.endpoint.role.prefills]
        return [st for st in cands if st.endpoint.role.decodes]

    def why(self, cycle: Cycle) -> str:
        """Names the phase."""
        assert isinstance(self.params, RoleParams)
        return f"role does not run {self.params.phase}"
