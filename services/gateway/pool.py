"""The Envoy endpoint set (EDS) of the pool the picker sees.

The pool itself (built from the engine servers' own reports) lives in ``shared.host.engine_feed``, shared
with the NATS picker service; its names are re-exported here for the gateway's callers.
"""

from __future__ import annotations

from typing import Any

from shared.core.routing import Endpoint
from shared.host.engine_feed import PoolView, address_of, endpoint_of, metrics_of

__all__ = ["ENGINES_CLUSTER", "INSTANCE_NAMESPACE", "PoolView", "address_of", "eds_document", "endpoint_of",
           "metrics_of"]

ENGINES_CLUSTER = "gantry_engines"
INSTANCE_NAMESPACE = "gantry"  # endpoint metadata naming the instance (no Envoy filter reads it)


def eds_document(endpoints: list[Endpoint], version: int) -> dict[str, Any]:
    """Envoy's file-based EDS document (a v3 DiscoveryResponse) listing the engines' addresses.

    The override-host load balancer only sends to hosts of the cluster, so the cluster must know them.
    """
    lb = []
    for ep in sorted(endpoints, key=lambda e: e.address):
        host, port = ep.address.rsplit(":", 1)
        host = host.strip("[]")  # an IPv6 address: bracketed in host:port, bare in a socket address
        lb.append({"endpoint": {"address": {"socket_address": {"address": host, "port_value": int(port)}}},
                   # the fail-open fallback chooses among the endpoints of the request's model by this; the
                   # instance id tells operators (and `gantry up`'s demo) which instance an address is
                   "metadata": {"filter_metadata": {"envoy.lb": {"model": ep.model},
                                                    INSTANCE_NAMESPACE: {"instance": ep.id}}}})
    return {
        "version_info": str(version),
        "resources": [{
            "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            "cluster_name": ENGINES_CLUSTER,
            "endpoints": [{"lb_endpoints": lb}] if lb else [],
        }],
    }
