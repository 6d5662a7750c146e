"""From a pick request to the routing core and back: pure apart from the router's own accounting."""

from __future__ import annotations

from collections.abc import Mapping

from shared.bus.messages import PickAnswer, PickItem
from shared.core.routing import Decision, Router, RouteRequest


def route_request(item: PickItem) -> RouteRequest:
    """The routing core's request for one pick item."""
    return RouteRequest(item.request_id, item.model, token_ids=item.token_ids, prompt=item.prompt,
                        priority=item.priority, tenant=item.tenant, lora=item.lora, slo_ttft_s=item.slo_ttft_s,
                        cache_salt=item.cache_salt)


def answer(router: Router, item: PickItem, addresses: Mapping[str, str], now: float) -> PickAnswer:
    """Route one item at ``now``: the endpoints with their addresses, or the refusal's code and reason.

    An endpoint the core chose but the pool has no address for (it just left) is left out; when none is left
    the answer is 503 and the request's in-flight accounting is released, so it is never sent blind.
    """
    out = router.route(route_request(item), now)
    if not isinstance(out, Decision):
        return PickAnswer(request_id=item.request_id, code=out.code, reason=out.reason)
    eps = [e for e in out.endpoints if e in addresses]
    if not eps:
        router.finished(item.request_id)
        return PickAnswer(request_id=item.request_id, code=503, reason="chosen endpoints have no address")
    return PickAnswer(request_id=item.request_id, endpoints=eps, addresses=[addresses[e] for e in eps],
                      prefill=out.prefill)
