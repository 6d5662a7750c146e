"""Virtual-time cluster simulation: N engine replicas behind a simple router, replaying a trace."""

from shared.core.sim.brokered import BrokeredResult, BrokeredSpec, Outcome, simulate_brokered
from shared.core.sim.cluster import ClusterSpec, SimResult, simulate
from shared.core.sim.routers import ROUTERS, LeastOutstanding, RoundRobin, Router, make_router
from shared.core.sim.workload import TraceRequest

__all__ = [
    "ROUTERS",
    "BrokeredResult",
    "BrokeredSpec",
    "ClusterSpec",
    "LeastOutstanding",
    "Outcome",
    "RoundRobin",
    "Router",
    "SimResult",
    "TraceRequest",
    "make_router",
    "simulate",
    "simulate_brokered",
]
