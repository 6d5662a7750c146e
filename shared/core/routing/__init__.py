"""The pure routing core (endpoint picker): filters → weighted scorers → picker, with admission, flow
control and shadow profiles. Deterministic (seeded RNG), clock-free (``now`` is passed in), no I/O.

Public API (stable; additions only):

- ``RouteRequest``, ``Endpoint``, ``EndpointMetrics``: inputs; ``Decision`` / ``Refusal`` (``Outcome``): answers
- ``Router(config, state=None, seed=0)``: ``route(request, now, commit=True, explain=False) -> Outcome``;
  events ``set_endpoints``, ``update_metrics``, ``apply_kv_events``, ``first_token``, ``finished``;
  ``shadow_stats[name].export()``
- ``RouterConfig``, ``decode_config(text, fmt)``, ``builtin_config(name)``, ``builtin_names()``
- ``PoolState`` / ``DataConfig``: the data layer (endpoints, metrics, in-flight, prefix indexes)
- ``UtilizationDetector`` / ``DetectorConfig``: saturation
- ``FlowController`` / ``FlowConfig``: priority bands, tenant fairness, bounded queues with TTL
- registries ``FILTERS``, ``SCORERS``, ``PICKERS``, ``HANDLERS``
"""

from shared.core.routing.builtin import builtin_config, builtin_names
from shared.core.routing.domain import (
    EXPIRED,
    NO_ENDPOINT,
    QUEUE_FULL,
    SHED,
    Decision,
    Endpoint,
    EndpointMetrics,
    EndpointState,
    FilterReport,
    Outcome,
    ProfileResult,
    Refusal,
    RouteRequest,
)
from shared.core.routing.filters import FILTERS
from shared.core.routing.handlers import HANDLERS
from shared.core.routing.pickers import PICKERS
from shared.core.routing.profile import RouterConfig, decode_config
from shared.core.routing.router import Router
from shared.core.routing.saturation import DetectorConfig, UtilizationDetector
from shared.core.routing.scorers import SCORERS
from shared.core.routing.state import DataConfig, PoolState

__all__ = [
    "EXPIRED",
    "FILTERS",
    "HANDLERS",
    "NO_ENDPOINT",
    "PICKERS",
    "QUEUE_FULL",
    "SCORERS",
    "SHED",
    "DataConfig",
    "Decision",
    "DetectorConfig",
    "Endpoint",
    "EndpointMetrics",
    "EndpointState",
    "FilterReport",
    "Outcome",
    "PoolState",
    "ProfileResult",
    "Refusal",
    "RouteRequest",
    "Router",
    "RouterConfig",
    "UtilizationDetector",
    "builtin_config",
    "builtin_names",
    "decode_config",
]
