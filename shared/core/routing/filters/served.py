"""served-filter: the endpoint serves the requested LoRA adapter (the pool already fixes the base model).

An adapter counts as served when the endpoint can load it (``Endpoint.adapters``) or reports it active
or waiting (vLLM ``lora_requests_info``). Requests without an adapter pass everywhere.
"""

from __future__ import annotations

from shared.core.routing.cycle import Cycle
from shared.core.routing.domain import EndpointState
from shared.core.routing.plugin import Filter


def serves(st: EndpointState, adapter: str) -> bool:
    """True when ``st`` can serve ``adapter``."""
    if adapter in st.endpoint.adapters:
        return True
    m = st.metrics
    return m is not None and (adapter in m.active_loras or adapter in m.waiting_loras)


class ServedFilter(Filter):
    """Drops endpoints that cannot serve the request's adapter."""

    type_name = "served-filter"

    def filter(self, cycle: Cycle, cands: list[EndpointState]) -> list[EndpointState]:
        """Keep endpoints serving ``request.lora``."""
        adapter = cycle.request.lora
        if not adapter:
            return cands
        return [st for st in cands if serves(st, adapter)]

    def why(self, cycle: Cycle) -> str:
        """Names the adapter."""
        return f"LoRA adapter {cycle.request.lora!r} not served"
