"""The gateway's picker without a network: the OpenAI body read as a routing request, the pool built from
engine reports, and the ext_proc exchange of one HTTP request driven message by message (protocol in, protocol
out, the routing core's in-flight accounting checked at each step)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import json_format

from ops.envoy import EXT_PROC, EXT_PROC_MODES, EnvoyOptions, envoy_config
from services.engine_server.textgen import TextModel
from services.gateway.epp import (
    DESTINATION,
    METADATA_NS,
    OFFLOOP_PARSE_BYTES,
    OFFLOOP_TOKENIZE_CHARS,
    PICKED,
    SERVED,
    Picked,
    Picker,
    Refusal,
)
from services.gateway.pool import PoolView, address_of, eds_document, metrics_of
from services.gateway.protocol import STREAMED_RESPONSE_MODE
from services.gateway.request import BadRequest, parse_request, tokenized
from services.gateway.service import shipped_tokenizer
from shared.bus.messages import EngineMetrics
from shared.core.routing import Router, builtin_config
from tests.unit.services.loop_turns import loop_turns

NOW = 1_000.0
SSE = "text/event-stream"


def report(instance: str, port: int, waiting: int = 0, model: str = "m", ts: float = NOW) -> EngineMetrics:
    return EngineMetrics(instance_id=instance, model=model, url=f"http://127.0.0.1:{port}", ts=ts,
                         num_requests_running=0, num_requests_waiting=waiting, kv_cache_usage_perc=0.0,
                         block_size=16, num_gpu_blocks=1000)


def chat(prompt: str = "hello", model: str = "m", **extra: Any) -> bytes:
    return msgspec.json.encode({"model": model, "messages": [{"role": "user", "content": prompt}], **extra})


# -- the request ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "why"), [
    (b"{oops", "not JSON"),
    (b"[1]", "JSON object"),
    (b'{"model": ""}', "'model'"),
    (b'{"model": "m"}', "'messages'"),
    (b'{"model": "m", "messages": []}', "non-empty"),
    (b'{"model": "m", "messages": ["x"]}', "object"),
    (b'{"model": "m", "messages": [{"role": "user", "content": 5}]}', "string"),
    (b'{"model": "' + b"m" * 100_000 + b'", "prompt": "x"}', "at most 512 characters"),  # echoed in refusals
    (b'{"model": "m", "prompt": "\\ud800"}', "not JSON"),  # a lone surrogate
    (b'{"model": "m", "prompt": "x", "temperature": NaN}', "not JSON"),
    (b'{"model": "m", "prompt": "x", "temperature": 1e400}', "not JSON"),
])
def test_unroutable_bodies_are_refused_with_a_reason(body: bytes, why: str) -> None:
    with pytest.raises(BadRequest, match=why):
        parse_request("r", body, {})


@pytest.mark.parametrize("value", ["high", "1e400", "9" * 5000, "9" * 4000, str(1 << 31), str(-(1 << 31) - 1)])
def test_priority_header_must_be_a_32_bit_integer(value: str) -> None:
    with pytest.raises(BadRequest, match="x-gantry-priority"):
        parse_request("r", chat(), {"x-gantry-priority": value})


@pytest.mark.parametrize("max_tokens", [True, 0, -3, 10**30, "5", 2.5])
def test_a_max_tokens_that_is_no_length_an_engine_serves_is_no_expected_length(max_tokens: object) -> None:
    req, _ = parse_request("r", msgspec.json.encode({"model": "m", "prompt": "x", "max_tokens": max_tokens}), {})
    assert req.expected_output_tokens is None


def test_negative_priority_is_sheddable_and_stream_flag_is_read() -> None:
    req, stream = parse_request("r", chat(stream=True, max_tokens=7), {"x-gantry-priority": "-1"})
    assert req.sheddable and stream and req.expected_output_tokens == 7 and req.model == "m"


@pytest.mark.parametrize("prompt", [[5, 6, 7], [[5, 6, 7]]])
def test_a_prompt_of_token_ids_is_routed_on_those_ids(prompt: list[Any]) -> None:
    req, _ = parse_request("r", msgspec.json.encode({"model": "m", "prompt": prompt}), {})
    assert tokenized(req, shipped_tokenizer()) is req  # nothing left to tokenize
    assert list(req.token_ids or []) == [5, 6, 7] and req.prompt is None


@pytest.mark.parametrize("prompt", [[-1, 2], [1, 1 << 32], [1, 1 << 70], [[3, -4]]])
def test_prompt_token_ids_no_tokenizer_makes_are_a_bad_request(prompt: list[Any]) -> None:
    with pytest.raises(BadRequest, match="token ids"):
        parse_request("r", msgspec.json.encode({"model": "m", "prompt": prompt}), {})


def test_chat_tokens_are_exactly_what_the_emulated_engine_tokenizes() -> None:
    text = TextModel()
    msgs = [("system", "be brief"), ("user", "why is the sky blue?")]
    body = msgspec.json.encode({"model": "m", "messages": [{"role": r, "content": c} for r, c in msgs]})
    req, _ = parse_request("r", body, {})
    assert list(tokenized(req, shipped_tokenizer()).token_ids or []) == text.chat_prompt(msgs)


@pytest.mark.parametrize("body", [chat("why is the sky blue?", max_tokens=3), chat(""),
                                  msgspec.json.encode({"model": "m", "prompt": "once upon"}),
                                  msgspec.json.encode({"model": "m", "prompt": [1, 2, 3]})])
def test_a_prompt_tokenized_as_it_is_parsed_is_the_request_parse_then_tokenize_gives(body: bytes) -> None:
    tok = shipped_tokenizer()
    req, stream = parse_request("r", body, {"x-gantry-priority": "-1"})
    assert parse_request("r", body, {"x-gantry-priority": "-1"}, tok) == (tokenized(req, tok), stream)
    # a prompt at the bound or longer is left as text (the picker tokenizes it on a worker thread)
    assert parse_request("r", body, {"x-gantry-priority": "-1"}, tok, tokenize_below=1) == (req, stream)


# -- the pool -----------------------------------------------------------------------------------------------
def test_pool_joins_on_first_report_and_expires_silent_endpoints() -> None:
    view = PoolView(expire_s=2.0)
    assert view.observe(report("a", 8001), NOW)
    assert not view.observe(report("a", 8001), NOW + 1)  # same endpoint: no change
    assert view.observe(report("b", 8002), NOW + 2)
    assert view.expire(NOW + 3.5) == ["a"]  # silent 2.5 s; b only 1.5 s
    assert view.by_address() == {"127.0.0.1:8002": "b"}


def test_engine_url_without_a_port_is_rejected() -> None:
    with pytest.raises(ValueError, match="host:port"):
        address_of("http://engine")


def test_an_ipv6_engine_is_dialled_in_brackets_and_listed_bare_in_the_endpoint_file() -> None:
    assert address_of("http://[fd00::5]:8001") == "[fd00::5]:8001"  # "fd00::5:8001" names no port
    view = PoolView()
    view.observe(msgspec.structs.replace(report("a", 8001), url="http://[fd00::5]:8001"), NOW)
    sock = eds_document(list(view.endpoints.values()), 1)["resources"][0]["endpoints"][0]["lb_endpoints"][0]
    assert sock["endpoint"]["address"]["socket_address"] == {"address": "fd00::5", "port_value": 8001}


def test_eds_document_lists_every_endpoint_address() -> None:
    view = PoolView()
    view.observe(report("a", 8001), NOW)
    view.observe(report("b", 8002), NOW)
    doc = eds_document(list(view.endpoints.values()), 3)
    lb = doc["resources"][0]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in lb] == [8001, 8002]
    assert doc["version_info"] == "3"


def _envoy_config() -> dict[str, Any]:
    from pathlib import Path
    return envoy_config(EnvoyOptions(listen_port=1, admin_port=2, epp_port=3, eds_path=Path("/x/e.json")))


def test_envoy_config_routes_on_the_picker_list_and_streams_responses() -> None:
    text = msgspec.json.encode(_envoy_config()).decode()
    assert '"request_body_mode":"BUFFERED"' in text
    assert '"receiving_namespaces":{"untyped":["envoy.lb"]}' in text
    assert "override_host" in text and DESTINATION in text


def test_envoy_config_in_gies_exchange_streams_both_bodies_full_duplex_with_trailers() -> None:
    cfg = envoy_config(EnvoyOptions(listen_port=1, admin_port=2, epp_port=3, eds_path=Path("/x/e.json"),
                                    ext_proc_mode=EXT_PROC_MODES["gie"]))
    ext_proc = next(f["typed_config"] for f in _hcm(cfg)["http_filters"] if f["name"] == EXT_PROC)
    mode = ext_proc["processing_mode"]
    assert mode["request_body_mode"] == mode["response_body_mode"] == "FULL_DUPLEX_STREAMED"
    assert mode["request_trailer_mode"] == mode["response_trailer_mode"] == "SEND"  # Envoy refuses it otherwise


def _hcm(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]  # type: ignore[no-any-return]


def test_envoy_skips_the_response_body_unless_the_picker_overrides_with_the_mode_it_allows() -> None:
    ext_proc = next(f["typed_config"] for f in _hcm(_envoy_config())["http_filters"] if f["name"] == EXT_PROC)
    assert ext_proc["processing_mode"]["request_body_mode"] == "BUFFERED"
    assert ext_proc["processing_mode"]["response_body_mode"] == "NONE"
    assert ext_proc["allow_mode_override"] is True
    assert ext_proc["allowed_override_modes"] == [STREAMED_RESPONSE_MODE]
    assert STREAMED_RESPONSE_MODE["response_body_mode"] == "STREAMED"


# -- the ext_proc exchange -------------------------------------------------------------------------------
def picker(*reports: EngineMetrics) -> tuple[Picker, Router]:
    router = Router(builtin_config("default"))
    view = PoolView()
    for r in reports:
        view.observe(r, NOW)
    router.set_endpoints(list(view.endpoints.values()))
    for r in reports:
        router.update_metrics(r.instance_id, metrics_of(r))
    addrs = {e.id: e.address for e in view.endpoints.values()}
    return Picker(router, lambda: addrs, clock=lambda: NOW + 0.01), router


def headers_msg(rid: str = "req-1", eos: bool = False) -> pb.ProcessingRequest:
    hs = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in
          ((":method", "POST"), (":path", "/v1/chat/completions"), ("x-request-id", rid))]
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=hs),
                                                               end_of_stream=eos))


def body_msg(body: bytes) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))


def resp_headers(served: str = "", content_type: str = "", status: str = "") -> pb.ProcessingRequest:
    hs = [base_pb2.HeaderValue(key=k, raw_value=v.encode())
          for k, v in ((":status", status), (SERVED, served), ("content-type", content_type)) if v]
    return pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=hs)))


def chunk(eos: bool = False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=b"data: {}\n\n", end_of_stream=eos))


class Exchange:
    """Envoy's side of one ext_proc stream, sent one message at a time."""

    def __init__(self, p: Picker) -> None:
        self.inbox: list[pb.ProcessingRequest] = []
        self.gen = p.Process(self._iter(), None)

    async def _iter(self) -> AsyncIterator[pb.ProcessingRequest]:
        while self.inbox:
            yield self.inbox.pop(0)

    async def send(self, msg: pb.ProcessingRequest) -> pb.ProcessingResponse:
        self.inbox.append(msg)
        return await self.gen.__anext__()


async def test_decision_goes_out_as_header_and_envoy_lb_metadata_with_the_fallback_list() -> None:
    p, _ = picker(report("a", 8001), report("b", 8002))
    ex = Exchange(p)
    assert (await ex.send(headers_msg())).HasField("request_headers")
    resp = await ex.send(body_msg(chat()))
    dest = resp.request_body.response.header_mutation.set_headers[0]
    assert dest.header.key == DESTINATION
    value = dest.header.raw_value.decode()
    assert sorted(value.split(",")) == ["127.0.0.1:8001", "127.0.0.1:8002"]  # chosen first, then the fallback
    assert resp.dynamic_metadata.fields[METADATA_NS].struct_value.fields[DESTINATION].string_value == value


async def test_inflight_counts_from_dispatch_through_first_chunk_to_end_of_stream() -> None:
    p, router = picker(report("a", 8001))
    ex = Exchange(p)
    await ex.send(headers_msg())
    await ex.send(body_msg(chat("x" * 400)))
    st = router.state.endpoints["a"]
    assert st.inflight_requests == 1 and st.inflight_tokens > 0
    picked = (await ex.send(resp_headers(content_type=SSE))).response_headers.response.header_mutation.set_headers[0]
    assert picked.header.key == PICKED and picked.header.raw_value == b"a"
    await ex.send(chunk())
    assert st.inflight_requests == 1 and st.inflight_tokens == 0  # prefill done, still decoding
    await ex.send(chunk())
    await ex.send(chunk(eos=True))
    with pytest.raises(StopAsyncIteration):
        await ex.gen.__anext__()
    assert st.inflight_requests == 0


async def _routed_over_a_and_b() -> tuple[Picker, Router, Exchange, str, str]:
    """A request routed over engines a and b (ports 8001, 8002): the exchange, its list's first and second address."""
    p, router = picker(report("a", 8001), report("b", 8002))
    ex = Exchange(p)
    await ex.send(headers_msg())
    resp = await ex.send(body_msg(chat("y" * 400)))
    first, second = resp.request_body.response.header_mutation.set_headers[0].header.raw_value.decode().split(",")
    return p, router, ex, first, second


ADDRESS_OF = {"127.0.0.1:8001": "a", "127.0.0.1:8002": "b"}


async def test_request_served_by_a_fallback_moves_its_load_there() -> None:
    p, router, ex, first, second = await _routed_over_a_and_b()
    ids = ADDRESS_OF
    picked, fallback = router.state.endpoints[ids[first]], router.state.endpoints[ids[second]]
    tokens = picked.inflight_tokens
    await ex.send(resp_headers(served=second, content_type=SSE))  # Envoy could not reach the first
    assert (picked.inflight_requests, picked.inflight_tokens) == (0, 0)
    assert (fallback.inflight_requests, fallback.inflight_tokens) == (1, tokens)
    assert p.counters.moved == 1
    await ex.send(chunk(eos=True))
    with pytest.raises(StopAsyncIteration):
        await ex.gen.__anext__()
    assert fallback.inflight_requests == 0 and fallback.inflight_tokens == 0


async def test_two_requests_with_the_same_client_request_id_are_counted_apart() -> None:
    p, router = picker(report("a", 8001))
    one, two = Exchange(p), Exchange(p)
    for ex in (one, two):
        await ex.send(headers_msg(rid="same"))
        await ex.send(body_msg(chat()))
    assert router.state.endpoints["a"].inflight_requests == 2
    await one.gen.aclose()
    assert router.state.endpoints["a"].inflight_requests == 1


def test_a_request_id_cannot_be_guessed_from_the_one_before() -> None:
    p, router = picker(report("a", 8001))
    ids = []
    for _ in range(600):  # past one pool of random tails
        got = p.pick_now(chat(), {})
        assert isinstance(got, Picked)
        ids.append(got.decision.request_id)
        router.finished(got.decision.request_id)
    tails = [rid.rsplit("-", 1)[1] for rid in ids]
    assert all(len(t) == 16 for t in tails)
    assert len(set(tails)) == len(tails)  # 64 random bits each: a counter alone would give the next one away


async def test_a_second_request_body_on_one_stream_books_nothing_and_the_stream_ends_its_one_request() -> None:
    p, router = picker(report("a", 8001))
    ex = Exchange(p)
    await ex.send(headers_msg())
    first = await ex.send(body_msg(chat()))
    again = await ex.send(body_msg(chat("another")))
    assert first.request_body.response.header_mutation.set_headers  # routed once
    assert again.HasField("request_body") and not again.request_body.response.header_mutation.set_headers
    assert router.state.in_flight() == 1 and p.counters.picks == 1
    await ex.gen.aclose()  # Envoy closed the stream: the HTTP request is over
    assert router.state.in_flight() == 0


async def test_client_gone_mid_stream_still_finishes_the_request() -> None:
    p, router = picker(report("a", 8001))
    ex = Exchange(p)
    await ex.send(headers_msg())
    await ex.send(body_msg(chat()))
    await ex.send(resp_headers(content_type=SSE))
    await ex.send(chunk())
    await ex.gen.aclose()  # Envoy closed the stream: the HTTP request is over
    assert router.state.endpoints["a"].inflight_requests == 0


@pytest.mark.parametrize(("reports", "body", "headers", "code"), [
    ((), chat(), {}, 503),  # no endpoint at all
    ((report("a", 8001),), chat(model="other"), {}, 503),  # none for this model
    ((report("a", 8001, waiting=50),), chat(), {"x-gantry-priority": "-1"}, 429),  # sheddable, saturated
    ((report("a", 8001),), b"{bad", {}, 400),
])
async def test_refusals_are_immediate_responses_with_the_protocol_codes(
        reports: tuple[EngineMetrics, ...], body: bytes, headers: dict[str, str], code: int) -> None:
    p, router = picker(*reports)
    hs = headers_msg()
    for k, v in headers.items():
        hs.request_headers.headers.headers.append(base_pb2.HeaderValue(key=k, raw_value=v.encode()))
    ex = Exchange(p)
    await ex.send(hs)
    resp = await ex.send(body_msg(body))
    assert resp.immediate_response.status.code == code
    assert msgspec.json.decode(resp.immediate_response.body)["error"]["code"] == code
    assert all(st.inflight_requests == 0 for st in router.state.endpoints.values())


async def test_a_body_nested_deeper_than_the_decoder_allows_is_refused_400_not_a_broken_stream() -> None:
    p, router = picker(report("a", 8001))
    ex = Exchange(p)
    await ex.send(headers_msg())
    resp = await ex.send(body_msg(b'{"model": "m", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"))
    assert resp.immediate_response.status.code == 400
    assert "nested too deep" in msgspec.json.decode(resp.immediate_response.body)["error"]["message"]
    assert router.state.in_flight() == 0


async def test_a_long_prompt_is_tokenized_off_the_event_loop_so_other_streams_go_on() -> None:
    p, router = picker(report("a", 8001))
    tokenizer = shipped_tokenizer()

    def slow_tokenize(text: str) -> list[int]:
        time.sleep(0.2)  # a large body: ~1 s a MB with the shipped tokenizer
        return tokenizer(text)

    p.tokenize = slow_tokenize
    async with loop_turns(0.01) as other_stream:
        resp, decision = await p.decide(chat("word " * (OFFLOOP_TOKENIZE_CHARS // 5 + 1)), {})
    assert other_stream.count >= 5 and decision is not None and resp.HasField("request_body")
    assert router.state.endpoints["a"].inflight_tokens > OFFLOOP_TOKENIZE_CHARS // 5  # routed on its token ids


@pytest.mark.parametrize("body", [
    msgspec.json.encode({"model": "m", "prompt": list(range(OFFLOOP_PARSE_BYTES // 4))}),  # token ids
    chat(messages=[{"role": "user", "content": "hi"}] * (OFFLOOP_PARSE_BYTES // 32)),  # many short messages
])
async def test_a_large_body_is_read_off_the_event_loop_and_routed(body: bytes) -> None:
    # read inline, 8 MB of token ids held every other check and stream for ~250 ms
    p, router = picker(report("a", 8001))
    p.tokenize = shipped_tokenizer()
    got = p.pick_now(body, {})
    assert not isinstance(got, Picked | Refusal)  # an awaitable: the reading happens on a worker thread
    picked = await got
    assert isinstance(picked, Picked) and router.state.endpoints["a"].inflight_tokens > 1000


async def test_a_large_unreadable_body_is_refused_400_from_the_worker_thread() -> None:
    p, router = picker(report("a", 8001))
    got = p.pick_now(msgspec.json.encode({"model": "m", "prompt": [-1] * OFFLOOP_PARSE_BYTES}), {})
    refused = await got  # type: ignore[misc]
    assert isinstance(refused, Refusal) and refused.code == 400 and "token ids" in refused.message
    assert router.state.in_flight() == 0


async def test_models_listing_is_answered_by_the_picker() -> None:
    p, _ = picker(report("a", 8001, model="m1"), report("b", 8002, model="m2"))
    ex = Exchange(p)
    hs = headers_msg(eos=True)
    hs.request_headers.headers.headers[0].raw_value = b"GET"
    hs.request_headers.headers.headers[1].raw_value = b"/v1/models"
    resp = await ex.send(hs)
    assert resp.immediate_response.status.code == 200
    assert [m["id"] for m in msgspec.json.decode(resp.immediate_response.body)["data"]] == ["m1", "m2"]


async def test_a_json_answer_is_not_streamed_through_the_picker_and_ends_with_the_http_request() -> None:
    p, router = picker(report("a", 8001))
    ex = Exchange(p)
    await ex.send(headers_msg())
    await ex.send(body_msg(chat()))
    answer = await ex.send(resp_headers(served="127.0.0.1:8001", content_type="application/json"))
    assert not answer.HasField("mode_override")  # Envoy skips the body: no round trip per chunk
    # the engine sent the whole answer: off its load at once, before Envoy ends the stream with the request
    assert router.state.endpoints["a"].inflight_requests == 0 and p.counters.finished == 0
    with pytest.raises(StopAsyncIteration):
        await ex.gen.__anext__()
    assert p.counters.finished == 1 and router.state.in_flight() == 0


@pytest.mark.parametrize(("status", "failing"), [("500", True), ("503", True), ("200", False), ("429", False)])
async def test_an_engines_error_answer_marks_it_failing_and_an_answer_clears_it(status: str, failing: bool) -> None:
    p, router = picker(report("a", 8001))
    router.state.endpoints["a"].failed_at = None if failing else NOW  # what the answer must turn over
    ex = Exchange(p)
    await ex.send(headers_msg())
    await ex.send(body_msg(chat()))
    await ex.send(resp_headers(served="127.0.0.1:8001", content_type="application/json", status=status))
    assert (router.state.endpoints["a"].failed_at is not None) is failing


async def test_a_request_envoy_moved_off_its_endpoint_marks_that_endpoint_failing() -> None:
    _, router, ex, first, second = await _routed_over_a_and_b()
    ids = ADDRESS_OF
    await ex.send(resp_headers(served=second, content_type="application/json", status="200"))
    assert router.state.endpoints[ids[first]].failed_at is not None
    assert router.state.endpoints[ids[second]].failed_at is None


async def test_a_client_gone_before_any_answer_says_nothing_of_the_endpoint() -> None:
    p, router = picker(report("a", 8001))
    router.state.endpoints["a"].failed_at = NOW
    ex = Exchange(p)
    await ex.send(headers_msg())
    await ex.send(body_msg(chat()))
    await ex.gen.aclose()
    assert router.state.endpoints["a"].failed_at == NOW and router.state.in_flight() == 0


async def test_a_streamed_answer_asks_envoy_for_its_chunks_to_see_the_first_token() -> None:
    p, router = picker(report("a", 8001))
    ex = Exchange(p)
    await ex.send(headers_msg())
    await ex.send(body_msg(chat("x" * 400)))
    answer = await ex.send(resp_headers(content_type="text/event-stream; charset=utf-8"))
    assert json_format.MessageToDict(answer.mode_override, preserving_proto_field_name=True) == \
        STREAMED_RESPONSE_MODE
    await ex.send(chunk())
    assert router.state.endpoints["a"].inflight_tokens == 0  # prefill done at the first chunk


async def test_each_decision_has_its_own_id_carrying_the_clients_and_replicas_do_not_share_ids() -> None:
    ids: list[str] = []
    for _ in range(2):  # two replicas (or one restarted)
        p, router = picker(report("a", 8001))
        for i in range(50):
            got = await p.pick(chat(f"q{i}"), {"x-request-id": "client-id"})
            assert isinstance(got, Picked)
            router.finished(got.decision.request_id)
            ids.append(got.decision.request_id)
    assert len(set(ids)) == len(ids) and all(i.startswith("client-id#") for i in ids)


@pytest.mark.parametrize("client_id", ["ab\ncd", "ab\rHTTP/1.1 200 OK", "a\x00b", "é"])
async def test_a_client_request_id_with_controls_or_non_ascii_is_left_out_of_the_pick_id(client_id: str) -> None:
    p, _ = picker(report("a", 8001))
    got = await p.pick(chat("q"), {"x-request-id": client_id})  # the pick id goes out as a header value
    assert isinstance(got, Picked) and got.decision.request_id.startswith("#")


def test_a_failed_write_of_envoys_endpoint_file_is_retried_until_it_holds_the_pool(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the feed saw no change after the failed write: Envoy kept a draining host (and never heard of new ones)
    from services.gateway import service
    from services.gateway.service import Gateway, GatewayOptions

    eds = tmp_path / "engines.json"
    gw = Gateway(GatewayOptions(nats_url="nats://unused", eds_path=eds))
    real = service.write_eds

    def disk_full(path: Path, doc: dict[str, object]) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(service, "write_eds", disk_full)
    gw.feed.on_metrics(report("a", 8001), NOW)
    assert gw._eds_stale and not eds.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(service, "write_eds", real)
    gw._pool_changed(gw.feed.routable)  # what the retry loop does each second while the file is stale
    assert not gw._eds_stale and "127.0.0.1" in eds.read_text()


def test_a_failed_endpoint_file_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    from services.gateway.service import write_eds

    with pytest.raises(OSError):
        write_eds(tmp_path / "missing-dir" / "engines.json", {"resources": []})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("status", "expected"), [
    ("200", True), ("404", True), ("500", False), ("502", False), (503, False), (200, True), ("504", None),
    ("", None), ("0", None), (0, None), ("abc", None), ("²", None), ("٣٠٠", None),  # none, or no number we read
])
def test_an_answer_is_a_status_under_500_and_no_status_says_nothing(status: int | str, expected: bool | None) -> None:
    from services.gateway.protocol import answered

    assert answered(status) is expected


def test_envoys_overflow_503_says_nothing_of_the_engine_and_an_engines_503_does() -> None:
    from services.gateway.protocol import answered

    assert answered("503", overloaded=True) is None and answered("503") is False
