"""The replay loop: submit pods one by one, no departures, and record allocation as workload arrives.

Arrived workload = cumulative GPU demand of the submitted pods (placed or not) over cluster capacity.
After each pod, the first time arrived workload reaches each whole percent p, the harness records the
allocated share of GPU capacity and the unallocated GPUs (capacity minus allocated GPU demand, in GPUs),
which is how the paper's analysis scripts compute them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .baselines import Policy
from .cluster import ClusterState, pod_shape
from .trace import Nodes, Pods

MAX_PERCENT = 130


@dataclass
class Curve:
    """Allocation as a function of arrived workload (index = whole percent arrived)."""

    unallocated: list[float] = field(default_factory=list)
    allocated_share: list[float] = field(default_factory=list)
    placed: int = 0
    failed: int = 0

    def at(self, percent: int) -> float:
        """Unallocated GPUs when ``percent`` % of capacity had arrived."""
        return self.unallocated[min(percent, len(self.unallocated) - 1)]


def replay(nodes: Nodes, pods: Pods, policy: Policy,
           on_arrival: Callable[[int], None] | None = None) -> Curve:
    """Submit ``pods`` in order to ``policy`` until the arrived workload reaches MAX_PERCENT %."""
    state = ClusterState(nodes)
    capacity = state.capacity_milli
    curve = Curve()
    arrived = 0
    for i in range(len(pods)):
        shape = pod_shape(pods, i)
        if on_arrival is not None:
            on_arrival(i)
        choice = policy.choose(state, shape)
        if choice is None:
            curve.failed += 1
        else:
            state.allocate(choice[0], choice[1], shape)
            curve.placed += 1
        arrived += shape.demand
        while len(curve.unallocated) <= MAX_PERCENT and arrived * 100 >= len(curve.unallocated) * capacity:
            curve.unallocated.append(state.unallocated_gpus())
            curve.allocated_share.append(state.allocated_milli / capacity)
        if len(curve.unallocated) > MAX_PERCENT:
            break
    return curve
