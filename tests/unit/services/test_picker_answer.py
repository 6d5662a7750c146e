"""The NATS picker: its translation between pick messages and the routing core, and how the service answers."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import msgspec
import pytest
from nats.aio.msg import Msg

from services.picker.answer import BAD_ITEM, answer, read_picks, route_request
from services.picker.service import PICK_CHUNK, PickerOptions, PickerService
from shared.bus.messages import MessageError, PickItem, PickProgress, PickReply, PickRequest, decode, encode
from shared.bus.runtime import Bus
from shared.core.routing import Endpoint, EndpointMetrics, Router, builtin_config
from shared.host.warmup import SETTLE_S, heard_every_engine
from tests.unit.services.loop_turns import loop_turns

NOW = 50.0


def router(*ids: str) -> Router:
    r = Router(builtin_config("default"), seed=0)
    r.set_endpoints([Endpoint(id=i, model="m", address=f"10.0.0.{k}:8000") for k, i in enumerate(ids)])
    for i in ids:
        r.update_metrics(i, EndpointMetrics(ts=NOW))
    return r


def test_an_item_becomes_the_cores_request_field_by_field() -> None:
    item = PickItem(request_id="a", model="m", token_ids=[1, 2], priority=-1, tenant="t", lora="l",
                    slo_ttft_s=0.5, cache_salt=7)
    rr = route_request(item)
    assert (rr.request_id, rr.model, list(rr.token_ids or ()), rr.priority, rr.tenant, rr.lora, rr.slo_ttft_s,
            rr.cache_salt) == ("a", "m", [1, 2], -1, "t", "l", 0.5, 7)


def test_a_decision_answers_endpoints_with_their_addresses_in_order() -> None:
    r = router("e0", "e1")
    a = answer(r, PickItem(request_id="a", model="m", token_ids=list(range(64))), {"e0": "h0:1", "e1": "h1:1"}, NOW)
    assert a.code == 200 and len(a.endpoints) == 2
    assert a.addresses == [{"e0": "h0:1", "e1": "h1:1"}[e] for e in a.endpoints]
    assert r.state.in_flight() == 1


def test_an_endpoint_without_address_is_left_out_and_none_left_is_503_with_its_load_released() -> None:
    r = router("e0")
    a = answer(r, PickItem(request_id="a", model="m", token_ids=[1]), {}, NOW)
    assert (a.code, a.endpoints, a.reason) == (503, [], "chosen endpoints have no address")
    assert r.state.in_flight() == 0


def test_a_refusal_keeps_the_cores_code_and_reason() -> None:
    a = answer(router("e0"), PickItem(request_id="a", model="other", token_ids=[1]), {"e0": "h:1"}, NOW)
    assert a.code == 503 and "other" in a.reason
    stale = answer(router("e0"), PickItem(request_id="b", model="m", token_ids=[1]), {"e0": "h:1"}, NOW + 10)
    assert stale.code == 503 and "stale" in stale.reason


def test_the_messages_round_trip_and_bounds_hold() -> None:
    req = PickRequest(picks=[PickItem(request_id="a", model="m", token_ids=[0, 2**32 - 1])])
    assert decode(encode(req), PickRequest) == req
    assert decode(encode(PickReply(error="x")), PickReply).error == "x"


def test_a_bad_item_is_read_as_its_reason_and_the_items_beside_it_as_items() -> None:
    ok = {"request_id": "a", "model": "m", "token_ids": [1]}
    items = read_picks(msgspec.json.encode({"picks": [ok, {"request_id": "b", "model": "m", "token_ids": [-1]},
                                                      {**ok, "request_id": "c"}]}))
    assert items[0] == PickItem(request_id="a", model="m", token_ids=[1])
    assert items[2] == PickItem(request_id="c", model="m", token_ids=[1])
    assert isinstance(items[1], str) and "token_ids" in items[1]


def test_a_bad_item_is_answered_with_its_reason_and_routes_nothing() -> None:
    r = router("e0")
    a = answer(r, "invalid PickItem: Expected `int` >= 0", {"e0": "h:1"}, NOW)
    assert (a.code, a.reason, a.endpoints) == (BAD_ITEM, "invalid PickItem: Expected `int` >= 0", [])
    assert r.state.in_flight() == 0


@pytest.mark.parametrize("body", [b"{}", b'{"picks": []}', b'{"picks": 5}', b"nope",
                                  b'{"v": 99, "picks": [{"request_id": "a", "model": "m"}]}'])
def test_a_message_unreadable_as_a_whole_is_still_refused_whole(body: bytes) -> None:
    with pytest.raises(MessageError):
        read_picks(body)


def test_the_picker_service_lets_go_of_requests_whose_end_never_came_after_its_flight_ttl() -> None:
    clock = [NOW]
    svc = PickerService(PickerOptions(nats_url="nats://unused", flight_ttl_s=60.0), clock=lambda: clock[0])
    svc.router = router("e0")
    answer(svc.router, PickItem(request_id="a", model="m", token_ids=[1]), {"e0": "h:1"}, NOW)
    clock[0] = NOW + 59
    assert svc.expire_flights() == 0
    clock[0] = NOW + 61
    assert svc.expire_flights() == 1 and svc.router.state.in_flight() == 0


async def test_a_large_pick_message_lets_the_other_handlers_run_while_it_is_answered() -> None:
    svc = PickerService(PickerOptions(nats_url="nats://unused"), clock=lambda: NOW)
    svc.router = router("e0")
    svc.feed.addresses = {"e0": "h:1"}
    svc.bus = cast(Bus, object())  # a valid message dead-letters nothing
    replies: list[bytes] = []

    class FakeMsg:
        subject, reply = "gantry.picker.pick", "inbox"
        data = encode(PickRequest(picks=[PickItem(request_id=f"r{i}", model="m", token_ids=[i]) for i in range(1000)]))

        async def respond(self, data: bytes) -> None:
            replies.append(data)

    async with loop_turns() as other_handler:
        await svc.on_pick(cast(Msg, FakeMsg()))
    assert other_handler.count >= 1000 // PICK_CHUNK
    reply = decode(replies[0], PickReply)
    assert [a.request_id for a in reply.answers] == [f"r{i}" for i in range(1000)]
    assert all(a.code == 200 for a in reply.answers)


async def test_a_pick_request_without_a_reply_inbox_is_dead_lettered_and_nothing_is_counted_in_flight() -> None:
    svc = PickerService(PickerOptions(nats_url="nats://unused"), clock=lambda: NOW)
    svc.router = router("e0")
    svc.feed.addresses = {"e0": "h:1"}
    dead: list[str] = []

    class FakeBus:
        async def dead_letter(self, subject: str, reason: str, payload: bytes = b"") -> None:
            dead.append(reason)

    class NoInbox:
        subject, reply = "gantry.picker.pick", ""
        data = encode(PickRequest(picks=[PickItem(request_id="a", model="m", token_ids=[1])]))

    svc.bus = cast(Bus, FakeBus())
    await svc.on_pick(cast(Msg, NoInbox()))
    assert svc.router.state.in_flight() == 0 and dead and "reply inbox" in dead[0]


@pytest.mark.parametrize("fails", ["too large", "nats away"])
async def test_picks_whose_reply_never_left_are_not_counted_in_flight(fails: str) -> None:
    # booked before the reply, they loaded their endpoints as phantoms for the whole flight TTL (1,800 s)
    svc = PickerService(PickerOptions(nats_url="nats://unused"), clock=lambda: NOW)
    svc.router = router("e0")
    svc.feed.addresses = {"e0": "h:1"}

    class SmallServer:
        max_payload = 2_000 if fails == "too large" else 8 << 20

    class FakeBus:
        nc = SmallServer()

    class FakeMsg:
        subject, reply = "gantry.picker.pick", "inbox"
        data = encode(PickRequest(picks=[PickItem(request_id=f"r{i}", model="m", token_ids=[i]) for i in range(50)]))

        async def respond(self, data: bytes) -> None:
            raise ConnectionError("nats away")

    svc.bus = cast(Bus, FakeBus())
    with pytest.raises(Exception, match=r"send fewer picks|nats away"):
        await svc.on_pick(cast(Msg, FakeMsg()))  # (the service's guard answers "internal error" and dead-letters)
    assert svc.router.state.in_flight() == 0 and svc.counters.picks == 0


def test_a_request_id_twice_in_one_message_is_answered_once_and_the_second_is_a_bad_item() -> None:
    # both were routed and answered; the books counted one, and its one end freed the first's load mid-run
    data = encode(PickRequest(picks=[PickItem(request_id="a", model="m", token_ids=[1]),
                                     PickItem(request_id="b", model="m", token_ids=[2]),
                                     PickItem(request_id="a", model="m", token_ids=[3])]))
    first, second, again = read_picks(data)
    assert isinstance(first, PickItem) and isinstance(second, PickItem)
    assert again == "request_id 'a' twice in one message"


async def test_progress_naming_a_failed_request_marks_its_engine_failing_and_a_finished_one_says_nothing() -> None:
    svc = PickerService(PickerOptions(nats_url="nats://unused"), clock=lambda: NOW)
    svc.router = router("e0")
    for rid in ("bad", "later"):
        answer(svc.router, PickItem(request_id=rid, model="m", token_ids=[1]), {"e0": "h:1"}, NOW)

    class RealBus:  # decode_or_reject as the service's bus does it
        async def decode_or_reject(self, subject: str, body: bytes, kind: type[PickProgress]) -> PickProgress:
            return decode(body, kind)

    class Progress:
        subject = "gantry.picker.progress"

        def __init__(self, p: PickProgress) -> None:
            self.data = encode(p)

    svc.bus = cast(Bus, RealBus())
    await svc.on_progress(cast(Msg, Progress(PickProgress(failed=["bad"]))))
    assert svc.router.state.endpoints["e0"].failing(NOW)
    await svc.on_progress(cast(Msg, Progress(PickProgress(finished=["later"]))))  # an end of unknown outcome
    assert svc.router.state.endpoints["e0"].failing(NOW) and svc.router.state.in_flight() == 0


# -- joining the pick queue -------------------------------------------------------------------------------------
def _unreported(*ids: str) -> Router:
    r = Router(builtin_config("default"), seed=0)
    r.set_endpoints([Endpoint(id=i, model="m", address=f"10.0.0.{k}:8000") for k, i in enumerate(ids)])
    return r


@pytest.mark.parametrize(("pool", "heard_for_s", "warm"), [
    (lambda: _unreported(), 5.0, False),  # no engine known yet
    (lambda: _unreported("e0"), 5.0, False),  # known (placement's pool) but never reported
    (lambda: router("e0", "e1"), 0.1, False),  # reported, but the others may not have yet
    (lambda: router("e0", "e1"), SETTLE_S, True),
])
def test_a_replica_takes_picks_only_once_every_engine_of_its_pool_has_reported(
        pool: Callable[[], Router], heard_for_s: float, warm: bool) -> None:
    assert heard_every_engine(pool().state, heard_for_s) is warm
