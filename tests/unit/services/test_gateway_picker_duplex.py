"""The picker's ext_proc exchange in GIE's full-duplex mode, driven as Envoy drives it: messages sent without
waiting for answers, the answers collected as they come (``Duplex``). The exchanges the picker cannot route in,
refused with their reason; and GIE's endpoint subset, in either exchange."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from services.gateway import epp
from services.gateway.epp import DESTINATION, ECHO_CHUNK_BYTES, METADATA_NS, PICKED, Picker, subset_hint
from services.gateway.protocol import SUBSET_KEY, SUBSET_NAMESPACE
from tests.unit.services.test_gateway_picker import ADDRESS_OF, SSE, chat, headers_msg, picker, report, resp_headers

MODE = processing_mode_pb2.ProcessingMode


def announced(msg: pb.ProcessingRequest, request: str = "FULL_DUPLEX_STREAMED",
              response: str = "FULL_DUPLEX_STREAMED") -> pb.ProcessingRequest:
    """``msg`` as the first message of a stream, with the body modes Envoy announces on it."""
    msg.protocol_config.request_body_mode = MODE.BodySendMode.Value(request)
    msg.protocol_config.response_body_mode = MODE.BodySendMode.Value(response)
    return msg


def body_part(data: bytes, eos: bool) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=eos))


def response_part(data: bytes, eos: bool = False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=eos))


class Duplex:
    """Envoy's side of one full-duplex ext_proc stream."""

    def __init__(self, p: Picker) -> None:
        self.inbox: asyncio.Queue[pb.ProcessingRequest | None] = asyncio.Queue()
        self.answers: list[pb.ProcessingResponse] = []
        self.task = asyncio.create_task(self._run(p))

    async def _messages(self) -> AsyncIterator[pb.ProcessingRequest]:
        while (msg := await self.inbox.get()) is not None:
            yield msg

    async def _run(self, p: Picker) -> None:
        async for answer in p.Process(self._messages(), None):
            self.answers.append(answer)

    async def send(self, *msgs: pb.ProcessingRequest, expect: int = 0) -> list[pb.ProcessingResponse]:
        """Send ``msgs`` at once; the answers that came to them (at least ``expect``, waited for; then a few turns
        of the loop for any more)."""
        seen = len(self.answers)
        for m in msgs:
            self.inbox.put_nowait(m)
        async with asyncio.timeout(5):
            while len(self.answers) < seen + expect and not self.task.done():
                await asyncio.sleep(0.001)
        for _ in range(20):
            await asyncio.sleep(0)
        return self.answers[seen:]

    async def close(self) -> None:
        """Envoy ends the stream (the HTTP request is over)."""
        self.inbox.put_nowait(None)
        await self.task


def handed_back(answers: list[pb.ProcessingResponse], side: str) -> bytes:
    return b"".join(getattr(a, side).response.body_mutation.streamed_response.body for a in answers)


async def test_the_headers_are_answered_with_the_destination_only_once_the_body_has_ended() -> None:
    p, router = picker(report("a", 8001), report("b", 8002))
    ex = Duplex(p)
    body = chat("x" * 400)
    assert await ex.send(announced(headers_msg()), body_part(body[:30], False)) == []  # Envoy holds the headers
    headers, echo = await ex.send(body_part(body[30:], True), expect=2)
    mutation = headers.request_headers.response.header_mutation
    sets = {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}
    assert sorted(sets[DESTINATION].split(",")) == ["127.0.0.1:8001", "127.0.0.1:8002"]
    assert sets["content-length"] == str(len(body))  # Envoy drops it in this mode; the engine gets it back
    assert headers.dynamic_metadata.fields[METADATA_NS].struct_value.fields[DESTINATION].string_value == \
        sets[DESTINATION]
    assert echo.request_body.response.body_mutation.streamed_response.end_of_stream
    assert handed_back([echo], "request_body") == body  # in this mode Envoy forwards only what comes back
    assert router.state.in_flight() == 1


async def test_a_large_body_goes_back_in_pieces_that_join_to_it() -> None:
    p, _ = picker(report("a", 8001))
    ex = Duplex(p)
    body = chat("y" * (3 * ECHO_CHUNK_BYTES))
    parts = [body[i : i + 16_384] for i in range(0, len(body), 16_384)]
    await ex.send(announced(headers_msg()), *(body_part(part, False) for part in parts[:-1]))
    headers, *echo = await ex.send(body_part(parts[-1], True), expect=5)
    assert headers.request_headers.response.header_mutation.set_headers
    assert len(echo) == -(-len(body) // ECHO_CHUNK_BYTES) >= 4
    assert all(len(a.request_body.response.body_mutation.streamed_response.body) <= ECHO_CHUNK_BYTES for a in echo)
    assert [a.request_body.response.body_mutation.streamed_response.end_of_stream for a in echo] == \
        [False] * (len(echo) - 1) + [True]
    assert handed_back(echo, "request_body") == body


async def test_request_trailers_end_the_body_and_follow_it_back() -> None:
    p, _ = picker(report("a", 8001))
    ex = Duplex(p)
    body = chat()
    await ex.send(announced(headers_msg()), body_part(body, False))
    headers, echo, trailers = await ex.send(pb.ProcessingRequest(request_trailers=pb.HttpTrailers()), expect=3)
    assert headers.request_headers.response.header_mutation.set_headers
    assert handed_back([echo], "request_body") == body
    assert not echo.request_body.response.body_mutation.streamed_response.end_of_stream  # the trailers end it
    assert trailers.HasField("request_trailers")


async def test_a_refusal_is_an_immediate_response_once_the_body_has_ended() -> None:
    p, router = picker(report("a", 8001))
    ex = Duplex(p)
    (refused,) = await ex.send(announced(headers_msg()), body_part(chat(model="other"), True), expect=1)
    assert refused.immediate_response.status.code == 503
    await ex.task  # the stream is over
    assert router.state.in_flight() == 0


async def test_a_body_past_the_limit_is_refused_413_without_waiting_for_its_end(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(epp, "MAX_BODY_BYTES", 1000)
    p, router = picker(report("a", 8001))
    ex = Duplex(p)
    (refused,) = await ex.send(announced(headers_msg()), body_part(b"z" * 600, False), body_part(b"z" * 600, False),
                               expect=1)
    assert refused.immediate_response.status.code == 413 and p.counters.refused == {413: 1}
    assert "over 1000 bytes" in msgspec.json.decode(refused.immediate_response.body)["error"]["message"]
    await ex.task
    assert router.state.in_flight() == 0 and p.counters.picks == 0


async def test_every_response_chunk_is_handed_back_and_the_first_of_a_stream_ends_its_prefill() -> None:
    p, router = picker(report("a", 8001))
    ex = Duplex(p)
    await ex.send(announced(headers_msg()), body_part(chat("x" * 400), True), expect=2)
    st = router.state.endpoints["a"]
    assert st.inflight_tokens > 0
    (answer,) = await ex.send(resp_headers(served="127.0.0.1:8001", content_type=SSE, status="200"), expect=1)
    assert not answer.HasField("mode_override")  # full duplex allows none, and sends every chunk anyway
    assert answer.response_headers.response.header_mutation.set_headers[0].header.key == PICKED
    chunks = [b"data: {\"a\": 1}\n\n", b"data: {\"b\": 2}\n\n", b"data: [DONE]\n\n"]
    first = await ex.send(response_part(chunks[0]), expect=1)
    assert st.inflight_tokens == 0 and st.inflight_requests == 1 and p.counters.first_tokens == 1
    rest = await ex.send(response_part(chunks[1]), response_part(chunks[2], True), expect=2)
    assert handed_back(first + rest, "response_body") == b"".join(chunks)
    assert rest[-1].response_body.response.body_mutation.streamed_response.end_of_stream
    await ex.task
    assert st.inflight_requests == 0 and p.counters.first_tokens == 1 and p.counters.finished == 1


async def test_a_whole_answer_is_finished_at_its_headers_and_its_body_still_handed_back() -> None:
    p, router = picker(report("a", 8001))
    ex = Duplex(p)
    await ex.send(announced(headers_msg()), body_part(chat(), True), expect=2)
    await ex.send(resp_headers(served="127.0.0.1:8001", content_type="application/json", status="200"), expect=1)
    assert router.state.in_flight() == 0  # the engine is done with it
    (echo,) = await ex.send(response_part(b'{"choices": []}', True), expect=1)
    assert handed_back([echo], "response_body") == b'{"choices": []}'
    assert p.counters.first_tokens == 0  # not a stream: no prefill signal from its body


async def test_response_trailers_are_acknowledged() -> None:
    p, _ = picker(report("a", 8001))
    ex = Duplex(p)
    await ex.send(announced(headers_msg()), body_part(chat(), True), expect=2)
    await ex.send(resp_headers(content_type=SSE, status="200"), response_part(b"data: x\n\n"), expect=2)
    (ack,) = await ex.send(pb.ProcessingRequest(response_trailers=pb.HttpTrailers()), expect=1)
    assert ack.HasField("response_trailers")
    await ex.close()


async def test_the_buffered_mode_announced_is_gantrys_own_exchange() -> None:
    p, _ = picker(report("a", 8001))
    ex = Duplex(p)
    (ack,) = await ex.send(announced(headers_msg(), "BUFFERED", "NONE"), expect=1)
    assert ack.HasField("request_headers") and not ack.request_headers.response.header_mutation.set_headers
    (decision,) = await ex.send(body_part(chat(), True), expect=1)
    assert decision.request_body.response.header_mutation.set_headers[0].header.key == DESTINATION
    await ex.close()


@pytest.mark.parametrize("mode", ["NONE", "STREAMED", "BUFFERED_PARTIAL"])
async def test_a_request_body_mode_no_decision_can_be_made_in_is_refused_500_with_its_name(
        mode: str, caplog: pytest.LogCaptureFixture) -> None:
    """Envoy's router would pick a host before the picker had read the body: the request would go round robin."""
    p, router = picker(report("a", 8001))
    (refused,) = await Duplex(p).send(announced(headers_msg(), mode), expect=1)
    assert refused.immediate_response.status.code == 500
    message = msgspec.json.decode(refused.immediate_response.body)["error"]["message"]
    assert mode in message and "FULL_DUPLEX_STREAMED" in message
    assert router.state.in_flight() == 0 and "every request is refused 500" in caplog.text
    caplog.clear()
    await Duplex(p).send(announced(headers_msg(), mode), expect=1)
    assert "refused 500" not in caplog.text  # said once a minute, not for every request


async def test_a_bodiless_request_is_answered_whatever_the_body_mode() -> None:
    p, _ = picker(report("a", 8001, model="m1"))
    hs = announced(headers_msg(eos=True), "STREAMED")
    hs.request_headers.headers.headers[0].raw_value = b"GET"
    hs.request_headers.headers.headers[1].raw_value = b"/v1/models"
    (models,) = await Duplex(p).send(hs, expect=1)
    assert models.immediate_response.status.code == 200


# -- GIE's endpoint subset ---------------------------------------------------------------------------------------
def with_subset(msg: pb.ProcessingRequest, value: object) -> pb.ProcessingRequest:
    """``msg`` carrying GIE's subset hint ``value`` in the metadata Envoy forwards."""
    ns = struct_pb2.Struct()
    ns.update({SUBSET_KEY: value})
    msg.metadata_context.filter_metadata[SUBSET_NAMESPACE].CopyFrom(ns)
    return msg


@pytest.mark.parametrize(("value", "allowed"), [
    (["127.0.0.1:8001"], {"127.0.0.1:8001"}),
    (["127.0.0.1:8001", "127.0.0.1:8002"], {"127.0.0.1:8001", "127.0.0.1:8002"}),
    ("127.0.0.1:8001, 127.0.0.1:8002", {"127.0.0.1:8001", "127.0.0.1:8002"}),  # one string, comma separated
    ([], set()),
    ([5, "127.0.0.1:8002"], {"127.0.0.1:8002"}),  # what is no address is left out
    (7, set()),  # unreadable: no endpoint allowed, never the whole pool
    # a "port" of 5,000 digits is no port (int() itself refuses past 4,300): kept as written, matching nothing
    (["127.0.0.1:" + "9" * 5000], {"127.0.0.1:" + "9" * 5000}),
])
def test_the_subset_hint_is_read_from_the_forwarded_metadata(value: object, allowed: set[str]) -> None:
    assert subset_hint(with_subset(headers_msg(), value).metadata_context) == allowed


def test_no_subset_hint_is_the_whole_pool() -> None:
    assert subset_hint(headers_msg().metadata_context) is None


@pytest.mark.parametrize("duplex", [True, False])
async def test_a_request_with_a_subset_goes_only_to_endpoints_in_it(duplex: bool) -> None:
    p, router = picker(report("a", 8001), report("b", 8002, waiting=4))  # a idle: the better one
    first = with_subset(announced(headers_msg(), *(() if duplex else ("BUFFERED", "NONE"))), ["127.0.0.1:8002"])
    ex = Duplex(p)
    await ex.send(first, expect=0 if duplex else 1)
    answers = await ex.send(body_part(chat(), True), expect=1)
    mutation = (answers[0].request_headers if duplex else answers[0].request_body).response.header_mutation
    assert mutation.set_headers[0].header.raw_value == b"127.0.0.1:8002"  # b alone, and no fallback outside it
    assert router.state.endpoints["b"].inflight_requests == 1 and router.state.endpoints["a"].inflight_requests == 0


@pytest.mark.parametrize("value", [[], ["10.9.9.9:1"]])
async def test_a_subset_with_no_endpoint_the_picker_knows_is_refused_503(value: list[str]) -> None:
    p, router = picker(report("a", 8001))
    ex = Duplex(p)
    await ex.send(with_subset(announced(headers_msg()), value))
    (refused,) = await ex.send(body_part(chat(), True), expect=1)
    assert refused.immediate_response.status.code == 503
    assert "subset" in msgspec.json.decode(refused.immediate_response.body)["error"]["message"]
    assert router.state.in_flight() == 0


# -- what a stream may hold -----------------------------------------------------------------------------------
async def test_bodies_held_across_streams_are_bounded_and_their_bytes_given_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Full duplex: a body comes in chunks the picker takes (the transport's window and its bytes-held bound let go
    of them) and holds until its end: slow uploads on many streams must not hold more than the picker's bound."""
    monkeypatch.setattr(epp, "MAX_HELD_BODY_BYTES", 1500)
    p, router = picker(report("a", 8001))
    first, second = Duplex(p), Duplex(p)
    assert await first.send(announced(headers_msg()), body_part(b"x" * 1000, False)) == []
    (refused,) = await second.send(announced(headers_msg()), body_part(b"y" * 1000, False), expect=1)
    assert refused.immediate_response.status.code == 503
    await second.task
    assert p.held_body == 1000  # the refused stream's bytes given back, the other's still held
    await first.close()
    assert p.held_body == 0  # a stream that ends mid-body gives its bytes back
    third = Duplex(p)
    await third.send(announced(headers_msg()), body_part(chat(), True), expect=2)
    assert router.state.in_flight() == 1 and p.held_body == 0  # decided: nothing held
    await third.close()
    assert router.state.in_flight() == 0


@pytest.mark.parametrize(("first", "later"), [(None, "FULL_DUPLEX_STREAMED"), ("FULL_DUPLEX_STREAMED", "BUFFERED")])
async def test_a_mode_announced_on_a_later_message_changes_nothing(first: str | None, later: str) -> None:
    """The exchange is the one the stream's first message announces: a later announcement switching it mid-request
    answered the headers twice, or never, and the body in the other exchange's form."""
    p, router = picker(report("a", 8001))
    ex = Duplex(p)
    hs = headers_msg() if first is None else announced(headers_msg(), first, first)
    await ex.send(hs, expect=0 if first else 1)
    await ex.send(announced(body_part(chat(), True), later, later), expect=1)
    kinds = [a.WhichOneof("response") for a in ex.answers]
    assert kinds.count("request_headers") == 1 and kinds[0] == "request_headers"
    assert router.state.in_flight() == 1
    await ex.close()
    assert router.state.in_flight() == 0


@pytest.mark.parametrize(("url", "hint"), [
    ("http://[fd00:0:0::5]:8001", "[fd00::5]:8001"),  # the engine's own spelling of its address, the proxy's canonical
    ("http://[fd00::5]:8001", "[FD00::0:5]:8001"),
    ("http://[::ffff:10.0.0.5]:8001", "[::ffff:a00:5]:8001"),
    ("http://127.0.0.1:8001", "[::ffff:127.0.0.1]:8001"),  # an IPv4 engine as a dual-stack proxy writes its address
    ("http://[::ffff:127.0.0.1]:8001", "127.0.0.1:8001"),
])
async def test_a_subset_names_an_ipv6_endpoint_however_either_side_spells_its_address(url: str, hint: str) -> None:
    p, router = picker(msgspec.structs.replace(report("a", 8001), url=url), report("b", 8002))
    ex = Duplex(p)
    await ex.send(with_subset(announced(headers_msg()), [hint]))
    answers = await ex.send(body_part(chat(), True), expect=2)
    assert answers[0].HasField("request_headers"), answers[0]  # not a 503
    assert router.state.endpoints["a"].inflight_requests == 1 and router.state.endpoints["b"].inflight_requests == 0
    await ex.close()


@pytest.mark.parametrize(("value", "routed_to"), [
    (["127.0.0.1"], {"a", "b"}),  # an IP alone, as GIE's reference picker matches: every port there
    (["[127.0.0.1]"], {"a", "b"}),
    (["127.0.0.1:8002"], {"b"}),  # with its port: that endpoint only
    (["127.0.0.2"], set()),
])
async def test_a_subset_entry_without_a_port_names_every_endpoint_at_that_ip(value: list[str],
                                                                          routed_to: set[str]) -> None:
    p, _ = picker(report("a", 8001), report("b", 8002))
    ex = Duplex(p)
    await ex.send(with_subset(announced(headers_msg()), value))
    answers = await ex.send(body_part(chat(), True), expect=1)
    if not routed_to:
        assert answers[0].immediate_response.status.code == 503
        return
    listed = answers[0].request_headers.response.header_mutation.set_headers[0].header.raw_value.decode()
    assert {ADDRESS_OF[a] for a in listed.split(",")} == routed_to

