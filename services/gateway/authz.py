"""The picker over Envoy's ``ext_authz`` filter (``--transport ext_authz``): one plain HTTP/1.1 check per request,
and the request's end from Envoy's gRPC access log.

Request side: Envoy buffers the body and sends headers and body as one HTTP/1.1 request, its path the
client's under ``CHECK_PREFIX`` (framing: ``services.gateway.http1``). The decision is ``Picker.pick``, the
same code as the ext_proc path. A decision is answered ``200`` with ``x-gateway-destination-endpoint:
ip:port[,ip:port...]`` (Envoy copies it to the upstream request, where the engines cluster's ``override_host``
policy reads it and walks it on retry), ``x-gantry-pick-id`` (the picker's id of the request, copied upstream
too, so the access log names it) and ``x-gantry-endpoints`` (copied to the client's response). A refusal is
answered with its status (400 / 429; a 503 or 504 shifted into 4xx, ``protocol.authz_status``, since Envoy
would take a 5xx for a failed check) and the OpenAI-style JSON error, which Envoy passes to the client (the
5xx restored by its local-reply mapper). GIE's endpoint subset hint, which ext_proc carries as metadata, comes
as a request header of the same name (``header_subset``).

Response side: no per-request hop. Envoy's ``http_grpc`` access logger keeps one stream to the picker and
sends batched entries (flushed every few ms); each names the pick id, the upstream host that served, and the
status. An entry ends the request's in-flight accounting and, when a fallback served it, moves it there first.
No entry marks prefill done on this path: the engines' own reports (load metrics, KV events) are what the
core sees of a running request's progress (docs/gateway.md, "The ext_authz transport").

Also served on the same HTTP port: ``GET /health`` (Envoy's active health check, answered on the event loop),
``GET /v1/models`` (Envoy routes it here as an ordinary upstream, the check disabled on that route) and
``GET /stats`` (the picker's counters and in-flight books, for a direct client).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import msgspec
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from services.gateway.epp import DESTINATION, PICKED, Picked, Picker, Refusal, error_body
from services.gateway.http1 import Connections, header_values, headers_of, response
from services.gateway.protocol import (
    CHECK_PREFIX,
    HEALTH_PATH,
    MODELS_PATH,
    PICK_ID_HEADER,
    READY_PATH,
    STATS_PATH,
    SUBSET_KEY,
    answered,
    authz_status,
)
from services.gateway.subset import subset_of_text
from shared.core.routing import Decision

log = logging.getLogger("gantry.gateway")

JSON = (("content-type", "application/json"),)
_OK = response(200)
_CHECKS = CHECK_PREFIX + "/"
MAX_IN_FLIGHT = 100_000  # beyond this many unended requests the oldest are let go (memory bound)


@dataclass(frozen=True, slots=True)
class Logged:
    """What one access-log entry says of a finished request."""

    pick_id: str
    upstream: str  # ip:port of the engine that served, "" when none did
    status: int


def logged_of(entry: object) -> Logged | None:
    """The fields the picker reads from an ``HTTPAccessLogEntry`` (None without a pick id: a request the picker
    did not route, e.g. ``/v1/models`` or a refusal)."""
    pick_id = entry.request.request_headers.get(PICK_ID_HEADER, "")  # type: ignore[attr-defined]
    if not pick_id:
        return None
    sock = entry.common_properties.upstream_remote_address.socket_address  # type: ignore[attr-defined]
    host = f"[{sock.address}]" if ":" in sock.address else sock.address  # as the pool writes an IPv6 engine
    upstream = f"{host}:{sock.port_value}" if sock.address else ""
    return Logged(pick_id, upstream, int(entry.response.response_code.value))  # type: ignore[attr-defined]


def header_subset(head: bytes, headers: dict[str, str]) -> frozenset[str] | None:
    """GIE's endpoint subset as this transport carries it: the ``SUBSET_KEY`` request header (Envoy sends an HTTP
    authorization service no metadata), read as the ext_proc path reads its metadata (``subset``); None without
    one. Repeated lines make one list, as Envoy joins them."""
    if SUBSET_KEY not in headers:  # one lookup a check: the head is read again only for a hinted request
        return None
    return subset_of_text(",".join(header_values(head, SUBSET_KEY)))


class AuthzPicker:
    """The ext_authz answers of one picker replica, and the in-flight requests it routed."""

    def __init__(self, picker: Picker, connections: Connections | None = None) -> None:
        self.picker = picker
        self.connections = connections  # the HTTP listener's, shown in /stats
        self.inflight: dict[str, Decision] = {}  # pick id -> its decision, until the access log ends it

    def answer(self, head: bytes, body: bytes) -> bytes | Awaitable[bytes]:
        """The HTTP answer to one request on the picker's port: a check (its path under ``CHECK_PREFIX``, where
        Envoy sends them) or one of the picker's own GETs. At once unless the decision waits for a worker thread
        (a long prompt): then an awaitable of it."""
        headers = headers_of(head)
        path = headers[":path"]
        if not path.startswith(_CHECKS):
            return self._own(headers[":method"], path.split("?")[0])
        headers[":path"] = path[len(CHECK_PREFIX):]  # the client's path, as the ext_proc path sees it
        if not body:  # as the ext_proc path answers a bodiless request
            why = f"{headers[':method'] or '?'} {headers[':path']}: a JSON body naming the model is required"
            return response(400, error_body(400, why), JSON)
        got = self.picker.pick_now(body, headers, header_subset(head, headers))
        if isinstance(got, Picked | Refusal):
            return self._checked(got)
        return self._checked_later(got)

    async def _checked_later(self, got: Awaitable[Picked | Refusal]) -> bytes:
        return self._checked(await got)

    def _checked(self, got: Picked | Refusal) -> bytes:
        if isinstance(got, Refusal):
            return response(authz_status(got.code), error_body(got.code, got.message), JSON)
        rid = got.decision.request_id
        self.inflight[rid] = got.decision
        # deferred assumed-state insertions, after the answer left (it is written when this returns)
        asyncio.get_running_loop().call_soon(self.picker.router.flush)
        return response(200, headers=((DESTINATION, got.destination), (PICK_ID_HEADER, rid),
                                      (PICKED, ",".join(got.decision.endpoints))))

    def _own(self, method: str, path: str) -> bytes:
        if method == "GET" and path == HEALTH_PATH:
            return _OK
        if method == "GET" and path == MODELS_PATH:
            return response(200, self.picker.models(), JSON)
        if method == "GET" and path == READY_PATH:
            return response(*self.picker.health(), JSON)
        if method == "GET" and path == STATS_PATH:
            return response(200, self.stats(), JSON)
        return response(404, error_body(404, f"{method or '?'} {path}: not a path of the picker"), JSON)

    def stats(self) -> bytes:
        """What ``GET /stats`` on the picker's port answers (operators, tests): its counters and the requests
        in flight, in all and per endpoint, and its HTTP listener's connections. Envoy does not route this path
        here; only a direct client reaches it."""
        c = self.picker.counters
        per = {e: s.inflight_requests for e, s in self.picker.router.state.endpoints.items()}
        out: dict[str, object] = {"picks": c.picks, "refused": c.refused, "finished": c.finished, "moved": c.moved,
                                  "inflight": len(self.inflight), "endpoints": per}
        if (conns := self.connections) is not None:
            out["connections"] = {"open": len(conns.open), "handshaking": len(conns.handshaking),
                                  "max": conns.max_connections, "refused": conns.refused,
                                  "idle_closed": conns.idle_closed, "held_bytes": conns.held,
                                  "closed_over_held": conns.over_held}
        return msgspec.json.encode(out)

    def unsent(self, answer: bytes) -> None:
        """An answer never reached Envoy (it timed out the check or reset the connection while the picker
        decided): no request carries its pick id, so no access-log entry will end it; end it now rather than
        leave its load on the endpoint until ``expire``."""
        rid = headers_of(answer.split(b"\r\n\r\n", 1)[0]).get(PICK_ID_HEADER)
        if rid is not None and self.inflight.pop(rid, None) is not None:
            self.picker.router.finished(rid)
            self.picker.counters.finished += 1

    def finished(self, entry: Logged) -> bool:
        """An access-log entry ended a request: charge it to the engine that served it, then end it. False when
        this replica did not route it (another replica did, or it was already ended)."""
        decision = self.inflight.pop(entry.pick_id, None)
        if decision is None:
            return False
        if entry.upstream:
            self.picker.served(decision, entry.upstream)
        self.picker.router.finished(decision.request_id, answered(entry.status), self.picker.clock())
        self.picker.counters.finished += 1
        return True

    def expire(self, now: float, max_age_s: float, keep: int = MAX_IN_FLIGHT) -> int:
        """End the requests in flight for longer than any request may last, and the oldest past ``keep``: their
        log entries were lost (the access-log stream broke while they ran, or Envoy dropped a full buffer).
        Returns how many."""
        gone = self.picker.router.expire_flights(now, max_age_s, keep)
        for rid in gone:
            if self.inflight.pop(rid, None) is not None:
                self.picker.counters.finished += 1
        # and the books of requests whose endpoint left the pool (the router dropped their flights with it): with
        # their log entries lost, nothing else ever ends them
        state = self.picker.router.state
        left = [rid for rid in self.inflight if not state.flying(rid)]
        for rid in left:
            del self.inflight[rid]
            self.picker.counters.finished += 1
        gone += left
        if gone:
            log.warning("%d requests in flight had no access-log entry (oldest %s): ended", len(gone), gone[0])
        return len(gone)


class AccessLogSink(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]  # generated, untyped
    """Envoy's gRPC access-log stream into the picker's books."""

    def __init__(self, authz: AuthzPicker) -> None:
        self.authz = authz
        self.entries = 0

    async def StreamAccessLogs(self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],  # gRPC name
                               context: object) -> als_pb2.StreamAccessLogsResponse:
        """One Envoy worker's log stream (open as long as Envoy runs)."""
        async for msg in request_iterator:
            for entry in msg.http_logs.log_entry:
                self.entries += 1
                got = logged_of(entry)
                if got is not None:
                    self.authz.finished(got)
        return als_pb2.StreamAccessLogsResponse()


async def expire_forever(authz: AuthzPicker, max_age_s: float, clock: Callable[[], float] = time.time,
                         every_s: float = 1.0) -> None:
    """``AuthzPicker.expire`` every ``every_s`` seconds, until cancelled (``clock``: the picker's own)."""
    while True:
        await asyncio.sleep(every_s)
        authz.expire(clock(), max_age_s)
