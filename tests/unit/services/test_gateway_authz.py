"""The picker over Envoy's ext_authz transport without a network: each check answered with the same decision as
the ext_proc path (the fallback list Envoy routes on, or the refusal's status and JSON error), the request kept
in flight until Envoy's access log ends it, and a fallback's load moved to the endpoint that served."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable

import grpc
import msgspec
import pytest
from envoy.config.core.v3 import address_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf import wrappers_pb2

from services.gateway.authz import AccessLogSink, AuthzPicker, Logged, header_subset, logged_of
from services.gateway.epp import DESTINATION, OFFLOOP_TOKENIZE_CHARS, PICKED, Refusal, subset_hint
from services.gateway.http1 import MAX_HEAD_BYTES, OneByOne, headers_of
from services.gateway.protocol import PICK_ID_HEADER, RELAYED_5XX, SUBSET_KEY, authz_status
from services.gateway.service import shipped_tokenizer
from services.gateway.subset import CACHED_CHARS, MAX_SUBSET_ENTRIES, subset_of_text
from tests.unit.services.test_gateway_http1 import _closed, connected
from tests.unit.services.test_gateway_picker import NOW, chat, headers_msg, picker, report
from tests.unit.services.test_gateway_picker_duplex import with_subset

CHAT_HEAD = b"POST /check/v1/chat/completions HTTP/1.1\r\nhost: gantry-picker\r\nx-request-id: r1"


def _split(out: bytes) -> tuple[int, dict[str, str], bytes]:
    head, body = out.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    hs = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split(" ")[1]), hs, body


async def _answered(authz: AuthzPicker, head: bytes, body: bytes) -> bytes:
    out = authz.answer(head, body)
    return out if isinstance(out, bytes) else await out


def _entry(pick_id: str, upstream: str, code: int = 200) -> accesslog_pb2.HTTPAccessLogEntry:
    ip, port = upstream.rsplit(":", 1) if upstream else ("", "0")
    entry = accesslog_pb2.HTTPAccessLogEntry(
        request=accesslog_pb2.HTTPRequestProperties(request_headers={PICK_ID_HEADER: pick_id} if pick_id else {}),
        response=accesslog_pb2.HTTPResponseProperties(response_code=wrappers_pb2.UInt32Value(value=code)))
    if ip:
        entry.common_properties.upstream_remote_address.CopyFrom(address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=ip, port_value=int(port))))
    return entry


async def test_a_decision_is_a_200_naming_the_list_and_the_request_stays_in_flight_until_logged() -> None:
    p, router = picker(report("a", 8001), report("b", 8002))
    authz = AuthzPicker(p)
    code, hs, _ = _split(await _answered(authz, CHAT_HEAD, chat()))
    assert code == 200
    assert set(hs[DESTINATION].split(",")) == {"127.0.0.1:8001", "127.0.0.1:8002"}
    assert hs[PICKED].split(",")[0] in {"a", "b"} and hs[PICK_ID_HEADER].startswith("r1#")
    assert sum(s.inflight_requests for s in router.state.endpoints.values()) == 1
    first = hs[DESTINATION].split(",")[0]
    assert authz.finished(Logged(hs[PICK_ID_HEADER], first, 200))
    assert sum(s.inflight_requests for s in router.state.endpoints.values()) == 0
    assert not authz.finished(Logged(hs[PICK_ID_HEADER], first, 200))  # a duplicate entry changes nothing
    assert p.counters.finished == 1 and p.counters.moved == 0


async def test_a_request_served_by_a_fallback_is_moved_there_before_it_ends() -> None:
    p, router = picker(report("a", 8001), report("b", 8002))
    authz = AuthzPicker(p)
    _, hs, _ = _split(await _answered(authz, CHAT_HEAD, chat("y" * 400)))
    first, second = hs[DESTINATION].split(",")
    assert first != second
    authz.finished(Logged(hs[PICK_ID_HEADER], second, 200))
    assert p.counters.moved == 1
    assert all(s.inflight_requests == 0 and s.inflight_tokens == 0 for s in router.state.endpoints.values())


async def test_an_access_log_entry_of_a_5xx_marks_the_endpoint_failing_and_a_2xx_clears_it() -> None:
    p, router = picker(report("a", 8001))
    authz = AuthzPicker(p)
    for code, failing in ((502, True), (200, False), (0, False)):  # 0: no response (the client left): unknown
        _, hs, _ = _split(await _answered(authz, CHAT_HEAD, chat()))
        authz.finished(Logged(hs[PICK_ID_HEADER], "127.0.0.1:8001" if code else "", code))
        assert (router.state.endpoints["a"].failed_at is not None) is failing


async def test_refusals_carry_their_status_and_an_openai_style_error() -> None:
    p, _ = picker(report("a", 8001, model="other"))
    authz = AuthzPicker(p)
    code, hs, body = _split(await _answered(authz, CHAT_HEAD, chat()))
    assert code == 453 and hs["content-type"] == "application/json"  # Envoy's mapper makes it 503 again
    assert msgspec.json.decode(body)["error"]["code"] == 503
    for bad in (b"{not json", b"[]", b'{"model": 3}'):
        code, _, body = _split(await _answered(authz, CHAT_HEAD, bad))
        assert code == 400 and msgspec.json.decode(body)["error"]["code"] == 400
    code, _, body = _split(await _answered(authz, b"POST /check/v1/chat/completions HTTP/1.1\r\nhost: p", b""))
    assert code == 400 and "POST /v1/chat/completions: a JSON body" in msgspec.json.decode(body)["error"]["message"]
    # a bodiless request is not counted, as on ext_proc
    assert authz.inflight == {} and p.counters.refused == {503: 1, 400: 3}


async def test_a_sheddable_request_on_a_saturated_pool_is_a_429() -> None:
    p, _ = picker(report("a", 8001, waiting=50))
    authz = AuthzPicker(p)
    code, _, body = _split(await _answered(authz, CHAT_HEAD + b"\r\nx-gantry-priority: -1", chat()))
    assert code == 429 and msgspec.json.decode(body)["error"]["code"] == 429


async def test_health_and_models_are_answered_without_a_decision() -> None:
    p, _ = picker(report("a", 8001))
    authz = AuthzPicker(p)
    assert _split(await _answered(authz, b"GET /health HTTP/1.1\r\nhost: x", b""))[0] == 200
    code, _, body = _split(await _answered(authz, b"GET /v1/models?x=1 HTTP/1.1\r\nhost: x", b""))
    assert code == 200 and [m["id"] for m in msgspec.json.decode(body)["data"]] == ["m"]
    assert p.counters.picks == 0


async def test_a_clients_request_for_the_pickers_own_paths_is_a_check_like_any_other() -> None:
    p, _ = picker(report("a", 8001))
    authz = AuthzPicker(p)
    code, _, body = _split(await _answered(authz, b"GET /check/health HTTP/1.1\r\nhost: x", b""))
    assert code == 400 and "GET /health" in msgspec.json.decode(body)["error"]["message"]
    assert _split(await _answered(authz, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x", chat()))[0] == 404
    assert p.counters.picks == 0


async def test_stats_show_the_requests_in_flight_per_endpoint() -> None:
    p, _ = picker(report("a", 8001))
    authz = AuthzPicker(p)
    await _answered(authz, CHAT_HEAD, chat())
    code, _, body = _split(await _answered(authz, b"GET /stats HTTP/1.1\r\nhost: x", b""))
    got = msgspec.json.decode(body)
    assert code == 200 and got["inflight"] == 1 and got["endpoints"] == {"a": 1} and got["picks"] == 1


async def test_requests_whose_log_entries_were_lost_are_ended_after_the_longest_request() -> None:
    p, router = picker(report("a", 8001))  # decides at NOW + 0.01
    authz = AuthzPicker(p)
    await _answered(authz, CHAT_HEAD, chat())
    assert authz.expire(NOW + 100, 600.0) == 0
    assert authz.expire(NOW + 601, 600.0) == 1
    assert router.state.endpoints["a"].inflight_requests == 0 and authz.inflight == {}


async def test_the_books_of_requests_whose_endpoint_left_and_whose_log_entries_were_lost_are_ended() -> None:
    p, router = picker(report("a", 8001), report("b", 8002))
    authz = AuthzPicker(p)
    for _ in range(20):
        await _answered(authz, CHAT_HEAD, chat())
    leaving = next(iter(authz.inflight.values())).endpoint
    on_it = [rid for rid, d in authz.inflight.items() if d.endpoint == leaving]
    staying = [st.endpoint for e, st in router.state.endpoints.items() if e != leaving]
    router.set_endpoints(staying)  # it left the pool (drained, or silent)
    assert authz.expire(NOW + 1, 600.0) == len(on_it)  # long before any request's age limit
    assert len(authz.inflight) == 20 - len(on_it) and all(router.state.flying(rid) for rid in authz.inflight)


async def test_past_the_in_flight_bound_the_oldest_requests_are_let_go() -> None:
    p, router = picker(report("a", 8001))
    authz = AuthzPicker(p)
    for _ in range(3):
        await _answered(authz, CHAT_HEAD, chat())
    assert authz.expire(NOW, 600.0, keep=1) == 2
    assert router.state.endpoints["a"].inflight_requests == 1 and len(authz.inflight) == 1


def test_the_pickers_5xx_refusals_travel_as_4xx_and_the_others_unchanged() -> None:
    assert [authz_status(c) for c in (400, 429, 500, 503, 504, 599)] == [400, 429, 450, 453, 454, 450]
    assert all(400 <= authz_status(c) < 500 for c in RELAYED_5XX)


def test_an_access_log_entry_is_read_for_its_pick_id_upstream_and_status() -> None:
    assert logged_of(_entry("r#1", "127.0.0.1:8002", 200)) == Logged("r#1", "127.0.0.1:8002", 200)
    assert logged_of(_entry("r#1", "", 503)) == Logged("r#1", "", 503)
    assert logged_of(_entry("", "127.0.0.1:8002")) is None  # not a routed request (e.g. /v1/models)


def test_an_ipv6_upstream_is_read_as_the_pool_writes_its_address() -> None:
    # bare, it never matched the pool's "[::1]:8002": a request a fallback served was never counted as moved
    assert logged_of(_entry("r#1", "::1:8002", 200)) == Logged("r#1", "[::1]:8002", 200)


async def test_the_access_log_stream_ends_the_requests_this_replica_routed_and_ignores_others() -> None:
    p, router = picker(report("a", 8001))
    authz = AuthzPicker(p)
    _, hs, _ = _split(await _answered(authz, CHAT_HEAD, chat()))
    sink = AccessLogSink(authz)

    async def stream() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
        msg = als_pb2.StreamAccessLogsMessage()
        msg.http_logs.log_entry.extend([_entry("other#x", "127.0.0.1:8001"), _entry("", ""),
                                        _entry(hs[PICK_ID_HEADER], "127.0.0.1:8001")])
        yield msg

    await sink.StreamAccessLogs(stream(), _no_context())
    assert sink.entries == 3 and authz.inflight == {}
    assert router.state.endpoints["a"].inflight_requests == 0


def _no_context() -> grpc.aio.ServicerContext:
    return None  # type: ignore[return-value]  # the sink never touches its context


async def test_the_router_is_flushed_after_the_answer() -> None:
    p, router = picker(report("a", 8001))
    flushed: list[int] = []
    router.flush = lambda: flushed.append(1)  # type: ignore[method-assign]
    await _answered(AuthzPicker(p), CHAT_HEAD, chat())
    await asyncio.sleep(0)
    assert flushed == [1]


async def test_a_decision_whose_answer_never_reached_envoy_is_not_left_in_flight() -> None:
    p, router = picker(report("a", 8001))
    authz = AuthzPicker(p)
    gone = asyncio.Event()

    async def decided_after_the_close(head: bytes, body: bytes) -> bytes:
        out = await _answered(authz, head, body)  # booked in flight...
        await gone.wait()  # ...while Envoy gives up on the check (its timeout) and closes the connection
        await asyncio.sleep(0.05)
        return out

    server = await asyncio.get_running_loop().create_server(
        lambda: OneByOne(decided_after_the_close, unsent=authz.unsent), "127.0.0.1", 0)
    async with server:
        _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        body = chat()
        writer.write(CHAT_HEAD + b"\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        for _ in range(100):
            if authz.inflight:
                break
            await asyncio.sleep(0.01)
        assert authz.inflight
        writer.close()
        gone.set()
        for _ in range(100):
            if not authz.inflight:
                break
            await asyncio.sleep(0.01)
    # no request carries its pick id, so no access-log entry would ever end it
    assert authz.inflight == {} and router.state.endpoints["a"].inflight_requests == 0
    assert p.counters.picks == p.counters.finished == 1


async def test_a_short_prompt_is_answered_at_once_and_a_long_one_after_tokenizing_off_the_loop() -> None:
    p, router = picker(report("a", 8001))
    p.tokenize = shipped_tokenizer()
    authz = AuthzPicker(p)
    now = authz.answer(CHAT_HEAD, chat())
    assert isinstance(now, bytes) and _split(now)[0] == 200  # no task, no extra turn of the event loop
    later = authz.answer(CHAT_HEAD, chat("z " * OFFLOOP_TOKENIZE_CHARS))
    assert isinstance(later, Awaitable)
    code, hs, _ = _split(await later)
    assert code == 200 and hs[DESTINATION] == "127.0.0.1:8001"
    assert sum(s.inflight_requests for s in router.state.endpoints.values()) == 2


async def test_stats_show_the_listeners_open_refused_and_idle_closed_connections() -> None:
    from services.gateway.http1 import Connections, OneByOne

    p, _ = picker(report("a", 8001))
    authz = AuthzPicker(p, Connections(idle_timeout_s=60.0, max_connections=1))
    assert authz.connections is not None
    kept, refused = OneByOne(authz.answer), OneByOne(authz.answer)
    assert authz.connections.admit(kept) and not authz.connections.admit(refused)
    _, _, body = _split(await _answered(authz, b"GET /stats HTTP/1.1\r\nhost: x", b""))
    assert msgspec.json.decode(body)["connections"] == {"open": 1, "handshaking": 0, "max": 1, "refused": 1,
                                                            "idle_closed": 0, "held_bytes": 0, "closed_over_held": 0}


# -- GIE's endpoint subset, as this transport carries it (a request header) ---------------------------------------
def _hinted(*values: str) -> bytes:
    """The chat check's head with one ``SUBSET_KEY`` line per value."""
    return CHAT_HEAD + b"".join(f"\r\n{SUBSET_KEY}: {v}".encode("latin-1") for v in values)


async def _routed_to(authz: AuthzPicker, head: bytes) -> set[str] | int:
    """The endpoint ids a check was routed over (its whole list), or the refusal's status as the client sees it."""
    code, hs, body = _split(await _answered(authz, head, chat()))
    if code != 200:
        return int(msgspec.json.decode(body)["error"]["code"])
    by_address = {a: e for e, a in authz.picker.addresses().items()}
    return {by_address[a] for a in hs[DESTINATION].split(",")}


async def test_a_check_with_a_subset_header_goes_only_to_the_endpoints_it_names() -> None:
    p, router = picker(report("a", 8001), report("b", 8002, waiting=4))  # a idle: the better one
    authz = AuthzPicker(p)
    assert await _routed_to(authz, _hinted("127.0.0.1:8002")) == {"b"}  # b alone, no fallback outside the subset
    assert router.state.endpoints["b"].inflight_requests == 1 and router.state.endpoints["a"].inflight_requests == 0


IPV6 = "http://[fd00:0:0::5]:8001"  # an engine that reports its address in a long spelling
HINTS = [
    "127.0.0.1:8002",
    "127.0.0.1:8002, 127.0.0.1:8003",  # one known, one not: the known one
    "127.0.0.1",  # an IP alone names every port there
    "[fd00::5]:8001", "[FD00::0:5]:8001", "fd00::5", "[fd00::5]", "[fd00::0.0.0.5]:8001",  # one IPv6 address
    "fd00::5:8001",  # not [fd00::5]:8001: an IPv6 address with no port, which no engine has
    "127.0.0.1:8002,127.0.0.1:8002,,127.0.0.1:08002",  # duplicates, an empty entry, a zero-padded port
    "", " ", ",,,",  # empty: no endpoint, never the whole pool
    "127.0.0.1:8004", "10.0.0.1:8002", "127.0.0.1:", "127.0.0.1:99999", "127.0.0.1:-1", "[127.0.0.1:8002",
    "gw-engine:8002", "not an address", "\x7f\xff;drop", "127.0.0.1:" + "9" * 5000, "::::", "[]:8002",
]


@pytest.mark.parametrize("hint", HINTS)
async def test_the_subset_header_allows_exactly_what_the_same_hint_in_ext_procs_metadata_allows(hint: str) -> None:
    """One reading for both transports: the header's answer is the metadata's, as a string and as a list."""
    reports = (msgspec.structs.replace(report("v6", 8001), url=IPV6), report("a", 8001), report("b", 8002))
    header = await _routed_to(AuthzPicker(picker(*reports)[0]), _hinted(hint))
    for value in (hint, hint.split(",")):
        meta = with_subset(headers_msg(), value).metadata_context
        p, _ = picker(*reports)
        got = await p.pick(chat(), {}, subset_hint(meta))
        metadata = got.code if isinstance(got, Refusal) else set(got.decision.endpoints)
        assert header == metadata, (hint, value)
    assert header == 503 or header  # a refusal, or some endpoint: never an empty list


async def test_a_subset_header_naming_no_endpoint_the_picker_knows_is_refused_503_and_books_nothing() -> None:
    p, router = picker(report("a", 8001))
    authz = AuthzPicker(p)
    for hint in ("10.9.9.9:1", "", "garbage"):
        code, _, body = _split(await _answered(authz, _hinted(hint), chat()))
        assert code == authz_status(503)  # Envoy's local-reply mapper makes it 503 again
        assert "subset" in msgspec.json.decode(body)["error"]["message"]
    assert authz.inflight == {} and router.state.in_flight() == 0 and p.counters.refused == {503: 3}


async def test_repeated_subset_header_lines_make_one_list_as_envoy_joins_them() -> None:
    p, _ = picker(report("a", 8001), report("b", 8002), report("c", 8003))
    authz = AuthzPicker(p)
    assert await _routed_to(authz, _hinted("127.0.0.1:8001", "127.0.0.1:8002")) == {"a", "b"}
    assert await _routed_to(authz, _hinted("127.0.0.1:8001,127.0.0.1:8002")) == {"a", "b"}
    assert await _routed_to(authz, _hinted("", "127.0.0.1:8003")) == {"c"}  # an empty line adds nothing


async def test_a_subset_header_as_large_as_envoy_forwards_is_read_and_one_of_too_many_entries_allows_none() -> None:
    p, _ = picker(report("a", 8001), report("b", 8002))
    authz = AuthzPicker(p)
    # ~60 KiB (Envoy's own limit on a request's headers): thousands of unknown entries, the known one last
    many = ",".join(f"10.{i >> 8 & 255}.{i & 255}.1:80" for i in range(MAX_SUBSET_ENTRIES - 1))
    assert await _routed_to(authz, _hinted(f"{many},127.0.0.1:8002")) == {"b"}
    assert await _routed_to(authz, _hinted(f"{many},127.0.0.1:8002,127.0.0.1:8001")) == 503  # one entry too many
    assert await _routed_to(authz, _hinted("127.0.0.1:8002" + "," * MAX_SUBSET_ENTRIES)) == 503  # empty ones count
    # the same bound on ext_proc's metadata list, which no header limit bounds
    assert subset_hint(with_subset(headers_msg(), ["127.0.0.1:8002"] * (MAX_SUBSET_ENTRIES + 1)).metadata_context) \
        == frozenset()


def test_a_hint_string_is_parsed_once_and_a_stream_of_distinct_ones_is_not_kept() -> None:
    hint = "127.0.0.1:8001,[fd00::5]:8001"
    assert subset_of_text(hint) is subset_of_text(hint)  # the same hint request after request: parsed once
    huge = "127.0.0.1:8001," + " " * CACHED_CHARS  # a long one is parsed each time, not held by the cache
    assert subset_of_text(huge) == {"127.0.0.1:8001"} and subset_of_text(huge) is not subset_of_text(huge)


async def test_a_check_without_a_subset_header_reads_no_more_of_its_head() -> None:
    p, _ = picker(report("a", 8001), report("b", 8002))
    authz = AuthzPicker(p)
    assert header_subset(CHAT_HEAD, headers_of(CHAT_HEAD)) is None
    assert await _routed_to(authz, CHAT_HEAD) == {"a", "b"}  # the whole pool


async def test_on_the_wire_a_subset_header_as_large_as_envoy_sends_is_answered_and_a_larger_head_is_closed() -> None:
    """Envoy refuses a client's headers past 60 KiB; the picker's framing closes a head past ``MAX_HEAD_BYTES``
    unanswered (the check fails and the failure mode decides), whatever header makes it that long."""
    p, _ = picker(report("a", 8001), report("b", 8002))
    authz = AuthzPicker(p)
    body = chat()
    filler = ",".join(["10.0.0.1:1"] * 5000)  # ~55 KB
    fits = _hinted(f"{filler},127.0.0.1:8002") + b"\r\ncontent-length: %d\r\n\r\n" % len(body) + body
    async with connected(authz.answer) as (reader, writer):
        writer.write(fits)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 453")  # 5,000 entries: past MAX_SUBSET_ENTRIES, so none allowed: 503
    trimmed = _hinted(",".join(["10.0.0.1:1"] * 4000) + ",127.0.0.1:8002")
    async with connected(authz.answer) as (reader, writer):
        writer.write(trimmed + b"\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200") and b"127.0.0.1:8002\r\n" in head
    too_long = _hinted("127.0.0.1:8002," * (MAX_HEAD_BYTES // 15 + 1))
    async with connected(authz.answer) as (reader, writer):
        writer.write(too_long + b"\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        assert await _closed(reader) == b""
