"""The ext_proc servicer: one gRPC stream per HTTP request (GIE endpoint picker protocol).

Request headers pass; the buffered request body is parsed and the routing core decides (what Envoy sends
and why: ``services.gateway.protocol``). The answer goes
out as the ``x-gateway-destination-endpoint`` header and as dynamic metadata
``envoy.lb/x-gateway-destination-endpoint`` (``ip:port[,ip:port...]``: the ordered fallback list Envoy walks
on retry), or as an immediate 503 (no endpoint) / 429 (shed) / 400 (bad request). On the way back the
response headers name the endpoint that served; only a streamed answer (or a traced one) asks Envoy for
its body, each chunk acknowledged at once (nothing is buffered), the first marking prefill done. The end of
the ext_proc stream, which Envoy holds open until the HTTP request ends, marks the request finished.
"""

from __future__ import annotations

import asyncio
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
    GATEWAY_HEALTH_PATH,
    MODELS_PATH,
    OVERLOADED,
    REQUEST_ID_HEADER,
    STREAMED_RESPONSE_MODE,
    answered,
)
from services.gateway.request import BadRequest, Tokenize, parse_request, tokenized
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

    def _tail(self) -> str:
        """64 fresh random bits, hex."""
        if self._tail_at >= len(self._tails):
            self._tails, self._tail_at = os.urandom(8 * 512), 0
        self._tail_at += 8
        return self._tails[self._tail_at - 8 : self._tail_at].hex()

    async def pick(self, body: bytes, headers: dict[str, str]) -> Picked | Refusal:
        """The decision on a complete request body, whatever the transport (``pick_now``, awaited when it
        tokenizes on a worker thread)."""
        got = self.pick_now(body, headers)
        return got if isinstance(got, Picked | Refusal) else await got

    def pick_now(self, body: bytes, headers: dict[str, str]) -> Picked | Refusal | Awaitable[Picked | Refusal]:
        """The decision on a complete request body, at once unless the prompt is long enough to be tokenized on
        a worker thread (then an awaitable of it). Pure apart from the router's own accounting. A decision is in
        flight until ``router.finished``; the caller flushes the router once its answer has left. (At once: an
        answer that needs no task costs the event loop no extra turns before it is written.)"""
        # the picker's own id: a client-chosen x-request-id could collide with another request in flight
        client = headers.get(REQUEST_ID, "")[:64]
        if not (client.isascii() and client.isprintable()):  # it goes out in a header: no CR, LF or other controls
            client = ""
        rid = f"{client}#{self._id_prefix}{next(self._ids):x}-{self._tail()}"
        if len(body) >= OFFLOOP_PARSE_BYTES:
            return self._parse_offloop(rid, body, headers)
        try:
            # a prompt shorter than OFFLOOP_TOKENIZE_CHARS is tokenized as it is parsed
            req, _stream = parse_request(rid, body, headers, self.tokenize, OFFLOOP_TOKENIZE_CHARS)
            if self.tokenize is not None and len(req.prompt or "") >= OFFLOOP_TOKENIZE_CHARS:
                # tokenizing costs ~1 s a MB here: on the event loop, one large body stalled every other
                # stream (Envoy's message timeout, stale engine reports); the shipped tokenizer frees the GIL
                return self._pick_offloop(req, self.tokenize)
        except BadRequest as err:
            return self._refused(400, str(err))
        return self._route(req)

    def _parse_offloop(self, rid: str, body: bytes, headers: dict[str, str]) -> Awaitable[Picked | Refusal]:
        return self._route_offloop(lambda: parse_request(rid, body, headers, self.tokenize)[0])

    def _pick_offloop(self, req: RouteRequest, tokenize: Tokenize) -> Awaitable[Picked | Refusal]:
        return self._route_offloop(lambda: tokenized(req, tokenize))

    async def _route_offloop(self, read: Callable[[], RouteRequest]) -> Picked | Refusal:
        """Route the request ``read`` makes on a worker thread (a 400 for what it cannot read)."""
        try:
            req = await asyncio.to_thread(read)
        except BadRequest as err:
            return self._refused(400, str(err))
        return self._route(req)

    def _route(self, req: RouteRequest) -> Picked | Refusal:
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

    async def decide(self, body: bytes, headers: dict[str, str]) -> tuple[pb.ProcessingResponse, Decision | None]:
        """The ext_proc answer to a complete request body (``pick``, as a ProcessingResponse)."""
        got = await self.pick(body, headers)
        if isinstance(got, Refusal):
            return immediate(got.code, got.message), None
        meta = struct_pb2.Struct()
        # Struct.update: 3x slower
        meta.fields[METADATA_NS].struct_value.fields[DESTINATION].string_value = got.destination
        resp = pb.ProcessingResponse(
            request_body=pb.BodyResponse(response=pb.CommonResponse(
                header_mutation=pb.HeaderMutation(set_headers=[_set_header(DESTINATION, got.destination)]),
                clear_route_cache=False)),
            dynamic_metadata=meta)
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
        """One HTTP request's ext_proc stream."""
        headers: dict[str, str] = {}
        decision: Decision | None = None
        first = True
        ok: bool | None = None  # did the engine answer (a status under 500)? None: no answer seen
        try:
            async for msg in request_iterator:
                kind = msg.WhichOneof("request")
                if kind == "request_headers":
                    headers = _headers(msg.request_headers)
                    if msg.request_headers.end_of_stream:
                        yield self._bodiless(headers)
                        return
                    yield _HEADERS_ACK
                elif kind == "request_body":
                    if decision is not None:  # one decision a stream: another body (not Envoy's buffered mode)
                        yield _BODY_ACK  # passes unread, booking nothing (booked again, the first never ended)
                        continue
                    resp, decision = await self.decide(msg.request_body.body, headers)
                    yield resp
                    self.router.flush()  # deferred assumed-state insertions, after the answer left
                    if decision is None:
                        return
                elif kind == "response_headers":
                    got = _headers(msg.response_headers)
                    if decision is not None:
                        self.served(decision, got.get(SERVED, ""))
                        code = got.get(":status", "")
                        ok = answered(code, overloaded=OVERLOADED in got)
                        if (pending := self.capturing.get(decision.request_id)) is not None:
                            pending.status = int(code) if code.isascii() and code.isdigit() else 0
                    mutation = pb.HeaderMutation(
                        set_headers=[_set_header(PICKED, ",".join(decision.endpoints))] if decision else [])
                    answer = pb.ProcessingResponse(response_headers=pb.HeadersResponse(
                        response=pb.CommonResponse(header_mutation=mutation)))
                    if decision is not None and not msg.response_headers.end_of_stream and (
                            self.capture is not None or got.get("content-type", "").startswith(EVENT_STREAM)):
                        answer.mode_override.CopyFrom(_STREAM_BODY)  # its chunks: prefill done, output length
                    elif decision is not None:
                        # a whole answer (JSON): the engine is done with it, though Envoy still sends the body
                        # and holds the stream open until then; the next request must not see it in flight
                        self.router.finished(decision.request_id, ok, self.clock())
                    yield answer
                    if msg.response_headers.end_of_stream:
                        return
                elif kind == "response_body":
                    if first and decision is not None:
                        first = False
                        self.router.first_token(decision.request_id)
                        self.counters.first_tokens += 1
                    if decision is not None and (pending := self.capturing.get(decision.request_id)) is not None:
                        pending.output.feed(msg.response_body.body)
                    yield _CHUNK_ACK
                    if msg.response_body.end_of_stream:
                        return
                else:  # trailers (not requested) or unknown: acknowledge
                    yield self._ack(kind)
        finally:
            if decision is not None:  # ended one way or another (done, client gone, upstream failed)
                self.router.finished(decision.request_id, ok, self.clock())
                self.counters.finished += 1
                pending = self.capturing.pop(decision.request_id, None)
                if pending is not None and self.capture is not None:
                    self.capture.finish(pending)

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

    @staticmethod
    def _ack(kind: str | None) -> pb.ProcessingResponse:
        if kind == "request_trailers":
            return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
        return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
