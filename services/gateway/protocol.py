"""What Envoy's ext_proc filter and Gantry's picker agree on, declared once for both sides (``ops.envoy``
writes it into Envoy's config, ``services.gateway.epp`` reads and answers by it). Plain data, no imports.

Each ext_proc message Envoy waits for is one picker round trip added to the request's latency. Two exchanges:

- GIE's (``GIE_PROCESSING_MODE``): both bodies full duplex. Envoy sends the request's headers and
  its body chunks without waiting; the picker answers the headers with the destination once the body has ended
  (Envoy holds them until then, so its router picks no host before), then hands the body back. One wait on the
  request side. The response headers and each response chunk come the same way and are handed back at once.
- Gantry's buffered one (``processing_mode()``, the default): the request headers, then the buffered body: two
  waits. The response headers once; the response body is skipped unless the picker asks for it per request with
  a mode override, for a streamed answer (its first chunk marks prefill done) or when the picker records a trace
  (output length), so no byte of a whole (JSON) answer passes through the picker. (Skipping the headers message
  and sending them as attributes with the body saves a round trip, but then Envoy's router picks a host before
  the picker has answered: tried, and requests landed round robin.)

In both, a whole (JSON) answer is finished on the engine when its headers come back, and the end of the HTTP
request ends the ext_proc stream (Envoy holds it open until then).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

REQUEST_ID_HEADER = "x-request-id"
PRIORITY_HEADER = "x-gantry-priority"
"""Integer priority of the request (< 0: sheddable, GIE v1.0 ``InferenceObjective.priority`` semantics)."""
FAIRNESS_HEADER = "x-gateway-inference-fairness-id"
"""Tenant for flow control (GIE flow-control fairness id)."""
SESSION_HEADER = "x-session-id"
PICK_ID_HEADER = "x-gantry-pick-id"
"""ext_authz transport: the picker's id of a routed request, set on the upstream request by the check's answer
and read back from Envoy's access log (``services.gateway.authz``)."""
CHECK_PREFIX = "/check"
"""ext_authz transport: Envoy sends each check to the client's path under this prefix, so a client's own
``/health`` or ``/stats`` is a check like any other request and never the picker's endpoint of that name."""
HEALTH_PATH = "/health"  # ext_authz transport: Envoy's active health check of the picker's HTTP port
GATEWAY_HEALTH_PATH = "/health"
"""A client's ``GET /health`` at the gateway (as vLLM serves it; load generators such as guidellm check it before a
run): answered by a picker, 200 while it knows an endpoint to route to, 503 before (or without) any. ext_proc: from
the headers; ext_authz: routed to the picker's ``READY_PATH``."""
READY_PATH = "/ready"  # ext_authz transport: the picker's answer to a client's GET /health (its HTTP port)
MODELS_PATH = "/v1/models"  # answered by the picker (ext_proc: from the headers; ext_authz: routed to its HTTP port)
RELAYED_5XX = (500, 502, 503, 504)
"""ext_authz transport: Envoy takes a 5xx answer from the check as the check failing (its failure mode then
decides: refuse with 500, or route without the picker). The picker's own 5xx refusals (503 no endpoint, 504
queue expiry) therefore travel as ``status - AUTHZ_5XX_SHIFT`` (unassigned 4xx codes) and Envoy's local-reply
mapper turns them back into the 5xx before the client sees them."""
AUTHZ_5XX_SHIFT = 50


def authz_status(code: int) -> int:
    """The status the picker answers Envoy's check with for a refusal of ``code`` (see ``RELAYED_5XX``)."""
    if code in RELAYED_5XX:
        return code - AUTHZ_5XX_SHIFT
    return 500 - AUTHZ_5XX_SHIFT if code >= 500 else code


STATS_PATH = "/stats"  # ext_authz transport: the picker's counters and in-flight books (direct clients only)


def processing_mode(response_body: str = "NONE") -> dict[str, Any]:
    """The buffered exchange's ``ProcessingMode`` (proto JSON): request headers and buffered body, response
    headers."""
    return {"request_header_mode": "SEND", "request_body_mode": "BUFFERED", "request_trailer_mode": "SKIP",
            "response_header_mode": "SEND", "response_body_mode": response_body, "response_trailer_mode": "SKIP"}


STREAMED_RESPONSE_MODE = processing_mode(response_body="STREAMED")
"""The override the picker sends with its response-headers answer when it needs the response body."""

SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
"""GIE's endpoint subset: when the proxy sets ``SUBSET_NAMESPACE`` / ``SUBSET_KEY`` (a list of ``ip:port``) in the
metadata it forwards with a request, the picker chooses only among those endpoints, and answers 503 when none of
them can take it (an empty list included). The ext_authz transport, which forwards no metadata, reads a request
header named ``SUBSET_KEY`` (comma-separated) instead, the same way (``services.gateway.subset``)."""

DUPLEX = "FULL_DUPLEX_STREAMED"
GIE_PROCESSING_MODE: dict[str, Any] = {
    "request_header_mode": "SEND", "request_body_mode": DUPLEX, "request_trailer_mode": "SEND",
    "response_header_mode": "SEND", "response_body_mode": DUPLEX, "response_trailer_mode": "SEND"}
"""The ``ProcessingMode`` GIE's own gateways configure (its protocol, ``../shared/research/routing.md`` 1.1): both
bodies streamed full duplex, trailers sent (Envoy refuses full duplex without them). Envoy sends the request's
headers and body chunks without waiting; the picker answers the headers (with the destination) once the body has
ended, then hands the body back, as it must in this mode, and echoes every response chunk. The picker serves
this exchange and the buffered one (``processing_mode()``) alike, told which by the mode Envoy announces on each
stream; ``ops.envoy`` writes this one with ``--ext-proc-mode gie``."""
ROUTABLE_BODY_MODES = ("BUFFERED", DUPLEX)
"""The request body modes a picker can route on: in the others Envoy lets the request's headers go to its router
(which picks a host) before the picker has read the body."""


class PickerTransport(StrEnum):
    """How Envoy asks the picker: gRPC ``ext_proc`` streams, or one plain HTTP/1.1 ``ext_authz`` check."""

    EXT_PROC = "ext_proc"
    EXT_AUTHZ = "ext_authz"


GRPC_SOCKET = "epp.sock"
"""The picker's gRPC listener (ext_proc streams, health checks, ext_authz's access log) in its socket directory."""
HTTP_SOCKET = "authz.sock"
"""The picker's HTTP listener (ext_authz checks, ``/health``, ``/v1/models``, ``/stats``) in its socket directory."""
DEFAULT_SOCKET_DIR = ".gantry/picker"
"""Where the picker listens and Envoy reaches it when neither is told otherwise (relative to the working
directory): a unix socket in a directory only the stack's user can enter, so no stranger can reach the picker."""

PICKER_IDLE_TIMEOUT_S = 120.0
"""A connection to the picker idle this long (nothing asked, nothing awaited) is closed by the picker
(``--idle-timeout-s``): idle connections opened by a stranger must not hold its file descriptors for ever."""
PICKER_MAX_CONNECTIONS = 1024
"""Connections the picker keeps open per listener (``--max-connections``); past it a new one is closed at once.
Envoy opens a few (its pool grows with checks in flight at once; its own circuit breaker stops at 1024)."""
IDLE_TIMEOUT_RANGE_S = (1.0, 86_400.0)
"""What ``--idle-timeout-s`` may be: the sweep runs every quarter of it (shorter would spin the loop), and its
milliseconds go into gRPC's 32-bit options (a day is far inside them; longer bounds nothing useful)."""
MAX_CONNECTIONS_LIMIT = 1_000_000  # past any open-files limit, and inside gRPC's 32-bit option


def idle_timeout_error(flag: str, value: float) -> str | None:
    """Why ``value`` cannot be a picker idle timeout (``flag``: the option it came from), or None."""
    low, high = IDLE_TIMEOUT_RANGE_S
    if not low <= value <= high:  # nan compares false
        return f"{flag} must be between {low:g} and {high:g} seconds, not {value:g}"
    return None


def max_connections_error(flag: str, value: int) -> str | None:
    """Why ``value`` cannot be a per-listener connection cap, or None."""
    if not 1 <= value <= MAX_CONNECTIONS_LIMIT:
        return f"{flag} must be between 1 and {MAX_CONNECTIONS_LIMIT}, not {value}"
    return None


def envoy_idle_timeout_s(picker_idle_timeout_s: float) -> float:
    """How long Envoy keeps an idle connection to a picker whose own idle timeout is ``picker_idle_timeout_s``:
    half of it, so Envoy always closes first and never writes a check onto a connection the picker is closing
    at that moment (the check would fail; the engines' keep-alive showed the fault, docs/gateway.md)."""
    return picker_idle_timeout_s / 2


OVERLOADED = "x-envoy-overloaded"  # on Envoy's own 503 when its circuit breakers overflowed


def answered(status: int | str, *, overloaded: bool = False) -> bool | None:
    """Whether the engine answered a request whose response carried ``status``: False for a 5xx (its error, or
    Envoy's when no engine of the list took it), True below; None when no status came (the client left first), for a
    504 (a timeout: a long generation that outlived Envoy's idle timeout says nothing against the engine, and a
    client could take a healthy engine out with three of them) and for Envoy's overflow 503 (``overloaded``)."""
    code = status if isinstance(status, int) else int(status) if status.isascii() and status.isdigit() else 0
    if code <= 0 or code == 504 or (overloaded and code == 503):
        return None
    return code < 500
