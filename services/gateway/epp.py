"""The ext_proc servicer: one gRPC stream per HTTP request (GIE endpoint picker protocol).

The routing core decides on the request's body; the answer goes out as the ``x-gateway-destination-endpoint``
header and as dynamic metadata ``envoy.lb/x-gateway-destination-endpoint`` (``ip:port[,ip:port...]``: the ordered
fallback list Envoy walks on retry), or as an immediate 503 (no endpoint) / 429 (shed) / 400 (bad request). Two
exchanges, told apart by the processing mode Envoy announces on each stream:

- Gantry's buffered one (``protocol.processing_mode()``, what ``ops.envoy`` writes by default): request headers
  pass; the buffered body is answered with the decision; only a streamed answer (or a traced one) asks Envoy for
  its response body.
- GIE's (``protocol.GIE_PROCESSING_MODE``, full duplex): the headers are answered, with the decision, once the
  body's chunks have all come; the body is then handed back, and so is every response chunk.

In both, the response headers name the endpoint that served.

Response chunks are acknowledged (or handed back) at once, never buffered; the first marks prefill done. The end
of the ext_proc stream, which Envoy holds open until the HTTP request ends, marks the request finished.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import json_format, struct_pb2

from services.gateway.capture import Pending, TraceWriter
from services.gateway.protocol import (
    DUPLEX,
    GATEWAY_HEALTH_PATH,
    MODELS_PATH,
    OVERLOADED,
    REQUEST_ID_HEADER,
    ROUTABLE_BODY_MODES,
    STREAMED_RESPONSE_MODE,
    SUBSET_KEY,
    SUBSET_NAMESPACE,
    answered,
)
from services.gateway.request import MAX_BODY_BYTES, BadRequest, Tokenize, parse_request, tokenized
from services.gateway.subset import NO_ENDPOINT, canonical_address, in_subset, subset_of_entries, subset_of_text
from shared.core.routing import Decision, Router, RouteRequest

log = logging.getLogger("gantry.gateway")

DESTINATION = "x-gateway-destination-endpoint"
SERVED = "x-gateway-destination-endpoint-served"
METADATA_NS = "envoy.lb"
PICKED = "x-gantry-endpoints"
"""Response header naming the picker's ordered list (for operators and tests: compare with ``SERVED``)."""
REQUEST_ID = REQUEST_ID_HEADER
EVENT_STREAM = "text/event-stream"
OFFLOOP_TOKENIZE_CHARS = 16_384  # a prompt this long is tokenized on a worker thread (~5 ms and more inline)
# a body this large is read on a worker thread, where the loop gets the GIL back every switch interval (5 ms):
# read inline, 8 MB of token ids or of chat messages held every other check and stream for 180-250 ms
OFFLOOP_PARSE_BYTES = 128 << 10
_STREAM_BODY = json_format.ParseDict(STREAMED_RESPONSE_MODE, processing_mode_pb2.ProcessingMode())
# the plain acknowledgements, built once (never mutated: gRPC only serializes them)
_HEADERS_ACK = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
_CHUNK_ACK = pb.ProcessingResponse(response_body=pb.BodyResponse())
_BODY_ACK = pb.ProcessingResponse(request_body=pb.BodyResponse())
_REQUEST_TRAILERS_ACK = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
_RESPONSE_TRAILERS_ACK = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
ECHO_CHUNK_BYTES = 64 << 10
"""Full duplex: the request body goes back to Envoy in pieces of at most this size (one gRPC message each), so a
large body is never one message as large as itself on either side."""
MAX_HELD_BODY_BYTES = 512 << 20
"""Full duplex: the request body bytes all streams together may hold until their bodies end. The picker takes each
chunk as it comes, so the transport's windows and its bytes-held bound let go of it: without this, slow uploads on
many streams each held up to ``MAX_BODY_BYTES`` (4096 streams a connection). Past it a body is refused 503."""
WARN_EVERY_S = 60.0  # a misconfigured gateway refuses every request: said in the log once a minute, not each time
_BODY_MODE = processing_mode_pb2.ProcessingMode.BodySendMode


@dataclass
class Counters:
    """What the picker did (exported for tests and ``gantry``)."""

    picks: int = 0
    refused: dict[int, int] = field(default_factory=dict)
    finished: int = 0
    first_tokens: int = 0
    moved: int = 0  # served by a fallback endpoint


def _headers(msg: pb.HttpHeaders) -> dict[str, str]:
    out: dict[str, str] = {}
    for h in msg.headers.headers:
        out[h.key.lower()] = h.raw_value.decode("latin-1") if h.raw_value else h.value
    return out


def _set_header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
                                      append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)


def error_body(code: int, message: str) -> bytes:
    """An OpenAI-style error body (both transports answer refusals with it)."""
    return msgspec.json.encode({"error": {"message": message, "type": "gateway_error", "code": code}})


def immediate(code: int, message: str) -> pb.ProcessingResponse:
    """An immediate HTTP answer with an OpenAI-style error body."""
    body = error_body(code, message)
    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=code),
        headers=pb.HeaderMutation(set_headers=[_set_header("content-type", "application/json")]),
        body=body, details=message[:200]))


@dataclass(slots=True)
class Exchange:
    """One ext_proc stream's state: the exchange Envoy announced, the request's headers and body, its decision."""

    headers: dict[str, str] = field(default_factory=dict)
    decision: Decision | None = None
    duplex_request: bool = False  # FULL_DUPLEX_STREAMED: headers and body chunks come without waiting for answers
    duplex_response: bool = False  # every response chunk comes, and reaches the client only as handed back
    unroutable: str | None = None  # a request body mode no decision can be made in (its name)
    subset: frozenset[str] | None = None  # GIE's subset hint: the addresses the request may go to
    body: bytearray = field(default_factory=bytearray)  # full duplex: the chunks so far
    decided: bool = False  # a decision (or refusal) has just been answered: the router's deferred work may run
    done: bool = False  # nothing more to answer: the stream ends
    wants_body: bool = False  # the response's chunks matter (a stream's first chunk, a trace's output length)
    first: bool = True  # no response chunk seen yet
    ok: bool | None = None  # did the engine answer (a status under 500)? None: no answer seen

    def configure(self, config: pb.ProtocolConfiguration) -> None:
        """Take the processing mode Envoy announces with a stream's first message (absent: the buffered one)."""
        request = _BODY_MODE.Name(config.request_body_mode)
        self.duplex_request = request == DUPLEX
        self.duplex_response = _BODY_MODE.Name(config.response_body_mode) == DUPLEX
        self.unroutable = None if request in ROUTABLE_BODY_MODES else request


def destination_metadata(destination: str) -> struct_pb2.Struct:
    """``envoy.lb/x-gateway-destination-endpoint``: the list, as dynamic metadata (the protocol's second channel)."""
    meta = struct_pb2.Struct()
    # Struct.update: 3x slower
    meta.fields[METADATA_NS].struct_value.fields[DESTINATION].string_value = destination
    return meta


def subset_hint(meta: base_pb2.Metadata) -> frozenset[str] | None:
    """GIE's endpoint subset in the metadata Envoy forwards with a request: the ``ip:port`` addresses it allows, or
    None when it sets none. A list of strings as the protocol writes it, or one comma-separated string, read as the
    ext_authz transport reads its header (``subset``); anything else allows no endpoint (the request is refused 503,
    as for an empty list)."""
    ns = meta.filter_metadata.get(SUBSET_NAMESPACE)
    if ns is None or SUBSET_KEY not in ns.fields:
        return None
    value = ns.fields[SUBSET_KEY]
    kind = value.WhichOneof("kind")
    if kind == "list_value":
        return subset_of_entries(v.string_value for v in value.list_value.values
                                 if v.WhichOneof("kind") == "string_value")
    if kind == "string_value":
        return subset_of_text(value.string_value)
    return NO_ENDPOINT


def duplex_answers(destination: str, body: bytes, end: bool) -> list[pb.ProcessingResponse]:
    """Full duplex: the decision on the request's headers, then its body handed back (Envoy forwards only what the
    picker returns in this mode) with its length; ``end``: the body ends the request (no trailers follow)."""
    headers = pb.ProcessingResponse(
        request_headers=pb.HeadersResponse(response=pb.CommonResponse(header_mutation=pb.HeaderMutation(
            set_headers=[_set_header(DESTINATION, destination), _set_header("content-length", str(len(body)))]))),
        dynamic_metadata=destination_metadata(destination))
    cuts = range(0, len(body), ECHO_CHUNK_BYTES) or range(1)
    return [headers, *(pb.ProcessingResponse(request_body=pb.BodyResponse(response=pb.CommonResponse(
        body_mutation=pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(
            body=body[i : i + ECHO_CHUNK_BYTES], end_of_stream=end and i + ECHO_CHUNK_BYTES >= len(body))))))
        for i in cuts)]


@dataclass(frozen=True, slots=True)
class Picked:
    """A routed request: the core's decision and the ``ip:port[,ip:port...]`` list Envoy walks."""

    decision: Decision
    destination: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request answered by the picker itself: 400 (bad request), 429 (shed) or 503 (no endpoint)."""

    code: int
    message: str


class Picker(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]  # generated, untyped
    """Gantry's endpoint picker over one routing core (owned by the service's event loop)."""

    def __init__(self, router: Router, addresses: Callable[[], dict[str, str]],
                 clock: Callable[[], float] = time.time, tokenize: Tokenize | None = None,
                 capture: TraceWriter | None = None) -> None:
        self.router = router
        self.tokenize = tokenize
        self.addresses = addresses  # endpoint id -> host:port, from the pool view
        self.clock = clock
        self.counters = Counters()
        self.capture = capture  # record routed requests as a replayable trace
        self.capturing: dict[str, Pending] = {}  # request id -> its trace line in the making
        # request ids unique across replicas and restarts (a random 64-bit prefix per picker, then a count) and
        # not guessable from one another (a random 64-bit tail each: an id is what ends a request's books in
        # the access-log transport). The tails come from a pool: a getrandom system call per decision cost more.
        self._id_prefix = uuid.uuid4().hex[:16]
        self._ids = itertools.count()
        self._tails = b""
        self._tail_at = 0
        self._warned_at = -WARN_EVERY_S
        self.held_body = 0  # full duplex: body bytes taken and not yet whole, all streams (``MAX_HELD_BODY_BYTES``)

    def _tail(self) -> str:
        """64 fresh random bits, hex."""
        if self._tail_at >= len(self._tails):
            self._tails, self._tail_at = os.urandom(8 * 512), 0
        self._tail_at += 8
        return self._tails[self._tail_at - 8 : self._tail_at].hex()

    async def pick(self, body: bytes, headers: dict[str, str],
                   subset: frozenset[str] | None = None) -> Picked | Refusal:
        """The decision on a complete request body, whatever the transport (``pick_now``, awaited when it
        tokenizes on a worker thread)."""
        got = self.pick_now(body, headers, subset)
        return got if isinstance(got, Picked | Refusal) else await got

    def pick_now(self, body: bytes, headers: dict[str, str], subset: frozenset[str] | None = None,
                 ) -> Picked | Refusal | Awaitable[Picked | Refusal]:
        """The decision on a complete request body (among the ``subset`` addresses only, when given), at once unless
        the prompt is long enough to be tokenized on a worker thread (then an awaitable of it). Pure apart from the
        router's own accounting. A decision is in flight until ``router.finished``; the caller flushes the router
        once its answer has left. (At once: an answer that needs no task costs the event loop no extra turns before
        it is written.)"""
        # the picker's own id: a client-chosen x-request-id could collide with another request in flight
        client = headers.get(REQUEST_ID, "")[:64]
        if not (client.isascii() and client.isprintable()):  # it goes out in a header: no CR, LF or other controls
            client = ""
        rid = f"{client}#{self._id_prefix}{next(self._ids):x}-{self._tail()}"
        if len(body) >= OFFLOOP_PARSE_BYTES:
            return self._parse_offloop(rid, body, headers, subset)
        try:
            # a prompt shorter than OFFLOOP_TOKENIZE_CHARS is tokenized as it is parsed
            req, _stream = parse_request(rid, body, headers, self.tokenize, OFFLOOP_TOKENIZE_CHARS)
            if self.tokenize is not None and len(req.prompt or "") >= OFFLOOP_TOKENIZE_CHARS:
                # tokenizing costs ~1 s a MB here: on the event loop, one large body stalled every other
                # stream (Envoy's message timeout, stale engine reports); the shipped tokenizer frees the GIL
                return self._pick_offloop(req, self.tokenize, subset)
        except BadRequest as err:
            return self._refused(400, str(err))
        return self._route(req, subset)

    def _parse_offloop(self, rid: str, body: bytes, headers: dict[str, str],
                       subset: frozenset[str] | None) -> Awaitable[Picked | Refusal]:
        return self._route_offloop(lambda: parse_request(rid, body, headers, self.tokenize)[0], subset)

    def _pick_offloop(self, req: RouteRequest, tokenize: Tokenize,
                      subset: frozenset[str] | None) -> Awaitable[Picked | Refusal]:
        return self._route_offloop(lambda: tokenized(req, tokenize), subset)

    async def _route_offloop(self, read: Callable[[], RouteRequest],
                             subset: frozenset[str] | None) -> Picked | Refusal:
        """Route the request ``read`` makes on a worker thread (a 400 for what it cannot read)."""
        try:
            req = await asyncio.to_thread(read)
        except BadRequest as err:
            return self._refused(400, str(err))
        return self._route(req, subset)

    def _route(self, req: RouteRequest, subset: frozenset[str] | None = None) -> Picked | Refusal:
        if subset is not None:  # addresses (or bare IPs) -> the endpoints the core knows there
            req = dataclasses.replace(req, subset=frozenset(
                e for e, a in self.addresses().items() if in_subset(canonical_address(a), subset)))
        rid = req.request_id
        now = self.clock()
        out = self.router.route(req, now)
        if not isinstance(out, Decision):
            return self._refused(out.code, out.reason)
        addr = self.addresses()
        targets = [addr[e] for e in out.endpoints if e in addr]
        if not targets:  # the core knows an endpoint the pool view just dropped: never send blind
            self.router.finished(rid)
            return self._refused(503, "chosen endpoints have no address")
        self.counters.picks += 1
        if self.capture is not None and req.token_ids:
            self.capturing[rid] = self.capture.begin(now, req.model, req.token_ids)
        return Picked(out, ",".join(targets))

    def _refused(self, code: int, message: str) -> Refusal:
        self.counters.refused[code] = self.counters.refused.get(code, 0) + 1
        return Refusal(code, message)

    async def decide(self, body: bytes, headers: dict[str, str],
                     subset: frozenset[str] | None = None) -> tuple[pb.ProcessingResponse, Decision | None]:
        """The ext_proc answer to a complete request body (``pick``, as a ProcessingResponse)."""
        got = await self.pick(body, headers, subset)
        if isinstance(got, Refusal):
            return immediate(got.code, got.message), None
        resp = pb.ProcessingResponse(
            request_body=pb.BodyResponse(response=pb.CommonResponse(
                header_mutation=pb.HeaderMutation(set_headers=[_set_header(DESTINATION, got.destination)]),
                clear_route_cache=False)),
            dynamic_metadata=destination_metadata(got.destination))
        return resp, got.decision

    def served(self, decision: Decision, served: str) -> None:
        """Charge the request to the endpoint that actually served it (Envoy may have walked the list)."""
        actual = {a: e for e, a in self.addresses().items()}.get(served)
        if actual is not None and actual != decision.endpoint and self.router.state.moved(
                decision.request_id, actual, self.clock()):
            self.counters.moved += 1
            log.info("request %s served by fallback %s (picked %s)", decision.request_id, actual, decision.endpoint)

    def health(self) -> tuple[int, bytes]:
        """The gateway's ``GET /health`` answer (status, JSON body): 200 while the picker knows an endpoint, else 503
        (nothing could be routed yet: placement has no RUNNING replica, or no engine has reported)."""
        known = len(self.router.state.endpoints)
        if known:
            return 200, msgspec.json.encode({"status": "ok", "endpoints": known})
        return 503, error_body(503, "the gateway knows no endpoint yet")

    def models(self) -> bytes:
        """The ``GET /v1/models`` answer: the models of the endpoints the picker knows."""
        models = sorted({ep.endpoint.model for ep in self.router.state.endpoints.values()})
        return msgspec.json.encode({"object": "list", "data": [
            {"id": m, "object": "model", "owned_by": "gantry"} for m in models]})

    async def Process(self, request_iterator: AsyncIterator[pb.ProcessingRequest],  # gRPC's method name
                      context: object) -> AsyncGenerator[pb.ProcessingResponse, None]:
        """One HTTP request's ext_proc stream, in the exchange Envoy announces (``Exchange``)."""
        ex = Exchange()
        opening = True
        try:
            async for msg in request_iterator:
                # the first message announces the exchange; one announced later would switch it mid-request (the
                # headers answered twice, or never)
                if opening and msg.HasField("protocol_config"):
                    ex.configure(msg.protocol_config)
                opening = False
                kind = msg.WhichOneof("request")
                if kind == "request_headers":
                    if msg.HasField("metadata_context"):
                        ex.subset = subset_hint(msg.metadata_context)
                    answer = self._request_headers(ex, msg.request_headers)
                    if answer is not None:
                        yield answer
                    if ex.done:
                        return
                elif kind == "request_body" or kind == "request_trailers":
                    for answer in await self._request_body(ex, msg, kind):
                        yield answer
                    if ex.decided:
                        ex.decided = False
                        self.router.flush()  # deferred assumed-state insertions, after the answer left
                    if ex.done:
                        return
                elif kind == "response_headers":
                    yield self._response_headers(ex, msg.response_headers)
                    if msg.response_headers.end_of_stream:
                        return
                elif kind == "response_body":
                    yield self._response_chunk(ex, msg.response_body)
                    if msg.response_body.end_of_stream:
                        return
                else:  # response trailers (the end of a response that has them) or unknown: acknowledge
                    yield _RESPONSE_TRAILERS_ACK
        finally:
            self.held_body -= len(ex.body)  # a stream ended mid-body (client gone, refused): its bytes go
            if (decision := ex.decision) is not None:  # ended one way or another (done, client gone, upstream failed)
                self.router.finished(decision.request_id, ex.ok, self.clock())
                self.counters.finished += 1
                pending = self.capturing.pop(decision.request_id, None)
                if pending is not None and self.capture is not None:
                    self.capture.finish(pending)

    def _request_headers(self, ex: Exchange, msg: pb.HttpHeaders) -> pb.ProcessingResponse | None:
        ex.headers = _headers(msg)
        if msg.end_of_stream:
            ex.done = True
            return self._bodiless(ex.headers)
        if ex.unroutable is not None:
            ex.done = True
            self._warn_unroutable(ex.unroutable)
            return immediate(500, f"the gateway is misconfigured: its ext_proc filter sends the request body "
                                  f"{ex.unroutable}, and the picker can route only on a body sent "
                                  f"{' or '.join(ROUTABLE_BODY_MODES)}")
        # full duplex: answered with the destination once the body has come (Envoy holds the headers until then)
        return None if ex.duplex_request else _HEADERS_ACK

    async def _request_body(self, ex: Exchange, msg: pb.ProcessingRequest, kind: str) -> list[pb.ProcessingResponse]:
        """The answers to a request body message (or the request's trailers): the decision once the body is whole."""
        if not ex.duplex_request:
            if kind == "request_trailers":  # not asked for in the buffered exchange
                return [_REQUEST_TRAILERS_ACK]
            if ex.decision is not None:  # one decision a stream: another body (not Envoy's buffered mode)
                return [_BODY_ACK]  # passes unread, booking nothing (booked again, the first never ended)
            resp, ex.decision = await self.decide(msg.request_body.body, ex.headers, ex.subset)
            ex.decided, ex.done = True, ex.decision is None
            return [resp]
        if ex.decision is not None:  # the request's trailers after its decision: passed on
            return [_REQUEST_TRAILERS_ACK] if kind == "request_trailers" else []
        trailers = kind == "request_trailers"
        if not trailers:
            chunk = msg.request_body.body
            if len(ex.body) + len(chunk) > MAX_BODY_BYTES:
                ex.done = True
                large = self._refused(413, f"request body over {MAX_BODY_BYTES} bytes")
                return [immediate(large.code, large.message)]
            if self.held_body + len(chunk) > MAX_HELD_BODY_BYTES:
                ex.done = True
                full = self._refused(503, "the gateway holds too many request bodies being uploaded: retry")
                return [immediate(full.code, full.message)]
            ex.body += chunk
            self.held_body += len(chunk)
            if not msg.request_body.end_of_stream:
                return []
        self.held_body -= len(ex.body)
        body, ex.body = bytes(ex.body), bytearray()
        got = await self.pick(body, ex.headers, ex.subset)
        ex.decided = True
        if isinstance(got, Refusal):
            ex.done = True
            return [immediate(got.code, got.message)]
        ex.decision = got.decision
        answers = duplex_answers(got.destination, body, end=not trailers)
        return [*answers, _REQUEST_TRAILERS_ACK] if trailers else answers

    def _response_headers(self, ex: Exchange, msg: pb.HttpHeaders) -> pb.ProcessingResponse:
        got = _headers(msg)
        decision = ex.decision
        if decision is not None:
            self.served(decision, got.get(SERVED, ""))
            code = got.get(":status", "")
            ex.ok = answered(code, overloaded=OVERLOADED in got)
            if (pending := self.capturing.get(decision.request_id)) is not None:
                pending.status = int(code) if code.isascii() and code.isdigit() else 0
        mutation = pb.HeaderMutation(
            set_headers=[_set_header(PICKED, ",".join(decision.endpoints))] if decision else [])
        answer = pb.ProcessingResponse(response_headers=pb.HeadersResponse(
            response=pb.CommonResponse(header_mutation=mutation)))
        ex.wants_body = decision is not None and not msg.end_of_stream and (
            self.capture is not None or got.get("content-type", "").startswith(EVENT_STREAM))
        if ex.wants_body:  # its chunks: prefill done, output length
            if not ex.duplex_response:  # full duplex sends every chunk anyway (and allows no override)
                answer.mode_override.CopyFrom(_STREAM_BODY)
        elif decision is not None:
            # a whole answer (JSON): the engine is done with it, though Envoy still sends the body and holds the
            # stream open until then; the next request must not see it in flight
            self.router.finished(decision.request_id, ex.ok, self.clock())
        return answer

    def _response_chunk(self, ex: Exchange, msg: pb.HttpBody) -> pb.ProcessingResponse:
        if ex.wants_body and (decision := ex.decision) is not None:
            if ex.first:
                ex.first = False
                self.router.first_token(decision.request_id)
                self.counters.first_tokens += 1
            if (pending := self.capturing.get(decision.request_id)) is not None:
                pending.output.feed(msg.body)
        if ex.duplex_response:  # the chunk goes on to the client only as the picker hands it back
            return pb.ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse(
                body_mutation=pb.BodyMutation(streamed_response=pb.StreamedBodyResponse(
                    body=msg.body, end_of_stream=msg.end_of_stream)))))
        return _CHUNK_ACK

    def _warn_unroutable(self, mode: str) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning("Envoy sends request bodies %s: every request is refused 500 until its ext_proc filter sends "
                        "them %s", mode, " or ".join(ROUTABLE_BODY_MODES))

    def _bodiless(self, headers: dict[str, str]) -> pb.ProcessingResponse:
        path = headers.get(":path", "")
        base = path.split("?")[0]
        if headers.get(":method") == "GET" and base in (MODELS_PATH, GATEWAY_HEALTH_PATH):
            code, body = (200, self.models()) if base == MODELS_PATH else self.health()
            return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
                status=http_status_pb2.HttpStatus(code=code),
                headers=pb.HeaderMutation(set_headers=[_set_header("content-type", "application/json")]),
                body=body))
        return immediate(400, f"{headers.get(':method', '?')} {path}: a JSON body naming the model is required")
