"""lora-affinity-scorer (GIE ``lora-affinity-scorer``): adapter active 1.0; not active but a free slot
(``len(active) + len(waiting) < max_loras``) 0.8; already waiting 0.6; otherwise 0. Requests without an
adapter score 1 everywhere (the scorer then does not discriminate).
"""

from __future__ import annotations

from shared.core.routing.cycle import Cycle
from shared.core.routing.domain import EndpointState
from shared.core.routing.plugin import Scorer

ACTIVE, FREE_SLOT, WAITING = 1.0, 0.8, 0.6


def lora_score(st: EndpointState, adapter: str) -> float:
    """One endpoint's score for ``adapter``."""
    m = st.metrics
    if m is None:
        return 0.0
    if adapter in m.active_loras:
        return ACTIVE
    if len(m.active_loras) + len(m.waiting_loras) < st.endpoint.max_loras:
        return FREE_SLOT
    if adapter in m.waiting_loras:
        return WAITING
    return 0.0


class LoraAffinityScorer(Scorer):
    """Prefers endpoints where the adapter is already loaded."""

    type_name = "lora-affinity-scorer"

    def score(self, cycle: Cycle, cands: list[EndpointState]) -> list[float] | None:
        """The GIE table."""
        adapter = cycle.request.lora
        if not adapter:
            return None
        return [lora_score(st, adapter) for st in cands]
