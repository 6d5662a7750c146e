"""The pool as the picker sees it, built from the engine servers' own reports (model-server protocol).

Pure: messages and ``now`` come in; the endpoint list, the metrics to apply and the Envoy endpoint set
(EDS) come out. An endpoint joins when its first ``EngineMetrics`` arrives and leaves when it has been
silent for ``expire_s`` (a killed server stops reporting); the routing core's staleness filter already
keeps it out of decisions long before that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from shared.bus.messages import EngineMetrics
from shared.core.roles import NodeRole
from shared.core.routing import Endpoint, EndpointMetrics

ENGINES_CLUSTER = "gantry_engines"


def address_of(url: str) -> str:
    """``host:port`` of an engine's base URL (what Envoy dials); raises ValueError without a port."""
    parts = urlsplit(url)
    if not parts.hostname or parts.port is None:
        raise ValueError(f"engine url {url!r} has no host:port")
    return f"{parts.hostname}:{parts.port}"


def endpoint_of(msg: EngineMetrics) -> Endpoint:
    """The routable endpoint an engine's report describes."""
    try:
        role = NodeRole(msg.role)
    except ValueError:
        role = NodeRole.MIXED
    return Endpoint(id=msg.instance_id, model=msg.model, address=address_of(msg.url), role=role,
                    block_size=msg.block_size, num_gpu_blocks=msg.num_gpu_blocks, max_loras=msg.max_loras)


def metrics_of(msg: EngineMetrics) -> EndpointMetrics:
    """The routing core's view of an engine's load."""
    return EndpointMetrics(ts=msg.ts, waiting=msg.num_requests_waiting, running=msg.num_requests_running,
                           kv_usage=msg.kv_cache_usage_perc, active_loras=tuple(msg.running_loras),
                           waiting_loras=tuple(msg.waiting_loras))


@dataclass
class PoolView:
    """Endpoints heard from recently, keyed by instance id."""

    expire_s: float = 3.0
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    last_heard: dict[str, float] = field(default_factory=dict)

    def observe(self, msg: EngineMetrics, now: float) -> bool:
        """Record a report; True when the endpoint set changed (joined, or moved/changed)."""
        ep = endpoint_of(msg)
        self.last_heard[ep.id] = now
        changed = self.endpoints.get(ep.id) != ep
        self.endpoints[ep.id] = ep
        return changed

    def expire(self, now: float) -> list[str]:
        """Drop endpoints silent for longer than ``expire_s``; returns their ids."""
        gone = [eid for eid, t in self.last_heard.items() if now - t > self.expire_s]
        for eid in gone:
            del self.last_heard[eid]
            del self.endpoints[eid]
        return gone

    def by_address(self) -> dict[str, str]:
        """Endpoint id of each ``host:port``."""
        return {ep.address: ep.id for ep in self.endpoints.values()}


def eds_document(endpoints: list[Endpoint], version: int) -> dict[str, Any]:
    """Envoy's file-based EDS document (a v3 DiscoveryResponse) listing the engines' addresses.

    The override-host load balancer only sends to hosts of the cluster, so the cluster must know them.
    """
    lb = []
    for ep in sorted(endpoints, key=lambda e: e.address):
        host, port = ep.address.rsplit(":", 1)
        lb.append({"endpoint": {"address": {"socket_address": {"address": host, "port_value": int(port)}}}})
    return {
        "version_info": str(version),
        "resources": [{
            "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            "cluster_name": ENGINES_CLUSTER,
            "endpoints": [{"lb_endpoints": lb}] if lb else [],
        }],
    }
