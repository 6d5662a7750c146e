"""Small builders for routing-core tests: a pool of endpoints with metrics, a cycle, a router."""

from __future__ import annotations

import random

from shared.core.roles import NodeRole
from shared.core.routing import Endpoint, EndpointMetrics, EndpointState, PoolState, Router, RouteRequest
from shared.core.routing.cycle import Cycle
from shared.core.routing.profile import decode_config

NOW = 100.0
BS = 16


def pool(*metrics: EndpointMetrics | None, model: str = "m", roles: tuple[NodeRole, ...] = (),
         adapters: tuple[frozenset[str], ...] = (), max_loras: int = 0) -> PoolState:
    """A state with one endpoint ``e<i>`` per metrics entry (None: never reported)."""
    st = PoolState()
    for i, m in enumerate(metrics):
        st.upsert(Endpoint(id=f"e{i}", model=model, role=roles[i] if roles else NodeRole.MIXED,
                           adapters=adapters[i] if adapters else frozenset(), max_loras=max_loras))
        if m is not None:
            st.update_metrics(f"e{i}", m)
    return st


def met(waiting: int = 0, running: int = 0, kv: float = 0.0, ts: float = NOW, **kw: object) -> EndpointMetrics:
    """Fresh metrics by default."""
    return EndpointMetrics(ts=ts, waiting=waiting, running=running, kv_usage=kv, **kw)  # type: ignore[arg-type]


def req(rid: str = "r", tokens: int = 0, seed: int = 1, **kw: object) -> RouteRequest:
    """A request with ``tokens`` prompt tokens of content ``seed`` (equal seeds share content)."""
    ids = [seed * 100_000 + i for i in range(tokens)] if tokens else None
    return RouteRequest(rid, kw.pop("model", "m"), token_ids=ids, **kw)  # type: ignore[arg-type]


def cycle(state: PoolState, request: RouteRequest | None = None, now: float = NOW, seed: int = 0) -> Cycle:
    """A cycle over ``state``."""
    return Cycle(request or req(), state, now, random.Random(seed))


def cands(state: PoolState, model: str = "m") -> list[EndpointState]:
    """The pool of ``model`` as a candidate list."""
    return list(state.pool(model))


def ids(endpoints: list[EndpointState]) -> list[str]:
    """Endpoint ids."""
    return [e.id for e in endpoints]


def router(yaml: str, state: PoolState | None = None, seed: int = 0) -> Router:
    """A router from YAML text."""
    return Router(decode_config(yaml), state, seed)


PD = """
plugins:
  - {type: role-filter, name: prefill-role, parameters: {phase: prefill}}
  - {type: role-filter, name: decode-role, parameters: {phase: decode}}
  - {type: queue-scorer}
profiles:
  - {name: prefill, plugins: [{ref: prefill-role}, {ref: queue-scorer}]}
  - {name: decode, plugins: [{ref: decode-role}, {ref: queue-scorer}]}
handler: {type: pd, parameters: {non_cached_tokens: 100}}
"""
"""A P/D router: decode always, prefill elsewhere for prompts of 100 uncached tokens or more."""
