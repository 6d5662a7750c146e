"""From a pick request to the routing core and back: pure apart from the router's own accounting."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

import msgspec

from shared.bus.messages import MessageError, PickAnswer, PickItem, PickRequest, decode
from shared.core.limits import MAX_BATCH_ITEMS
from shared.core.routing import Decision, Router, RouteRequest

BAD_ITEM = 400  # a PickAnswer code: this item could not be read (the others of its message are answered)


class _Picks(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """A pick message read down to its list of items, each still undecoded (to judge them one by one)."""

    picks: Annotated[list[msgspec.Raw], msgspec.Meta(min_length=1, max_length=MAX_BATCH_ITEMS)]
    v: int = 1


def read_picks(data: bytes) -> list[PickItem | str]:
    """The items of a pick message in order: each a ``PickItem``, or why it is invalid; raises MessageError when
    the message itself is unreadable (not JSON, no list of picks, too many, too large, a newer schema).

    One malformed item must not cost the valid ones beside it their answers (the project's rule for bad input):
    only when the message as a whole fails is it read again item by item.
    """
    try:
        return _once(list(decode(data, PickRequest).picks))
    except MessageError as whole:
        envelope = decode(data, _Picks)  # the message itself unreadable: MessageError, as before
        out: list[PickItem | str] = []
        for raw in envelope.picks:
            try:
                out.append(decode(bytes(raw), PickItem))
            except MessageError as exc:
                out.append(str(exc))
        if all(isinstance(it, PickItem) for it in out):
            raise whole from None  # the items are fine: what failed is the message's own framing
        return _once(out)


def _once(items: list[PickItem | str]) -> list[PickItem | str]:
    """``items`` with each request id after its first an invalid item: routed twice, both were answered, the books
    counted one, and the one end message freed the first's load while the second ran."""
    seen: set[str] = set()
    out: list[PickItem | str] = []
    for it in items:
        if isinstance(it, PickItem):
            if it.request_id in seen:
                out.append(f"request_id {it.request_id!r} twice in one message")
                continue
            seen.add(it.request_id)
        out.append(it)
    return out


def route_request(item: PickItem) -> RouteRequest:
    """The routing core's request for one pick item."""
    return RouteRequest(item.request_id, item.model, token_ids=item.token_ids, prompt=item.prompt,
                        priority=item.priority, tenant=item.tenant, lora=item.lora, slo_ttft_s=item.slo_ttft_s,
                        cache_salt=item.cache_salt)


def answer(router: Router, item: PickItem | str, addresses: Mapping[str, str], now: float) -> PickAnswer:
    """Route one item at ``now``: the endpoints with their addresses, or the refusal's code and reason; an item
    that could not be read (its reason in place of it) is answered ``BAD_ITEM`` with that reason.

    An endpoint the core chose but the pool has no address for (it just left) is left out; when none is left
    the answer is 503 and the request's in-flight accounting is released, so it is never sent blind.
    """
    if isinstance(item, str):
        return PickAnswer(request_id="", code=BAD_ITEM, reason=item)
    out = router.route(route_request(item), now)
    if not isinstance(out, Decision):
        return PickAnswer(request_id=item.request_id, code=out.code, reason=out.reason)
    eps = [e for e in out.endpoints if e in addresses]
    if not eps:
        router.finished(item.request_id)
        return PickAnswer(request_id=item.request_id, code=503, reason="chosen endpoints have no address")
    return PickAnswer(request_id=item.request_id, endpoints=eps, addresses=[addresses[e] for e in eps],
                      prefill=out.prefill)
