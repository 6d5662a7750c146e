"""The generated Envoy config: what a picker failure does (GIE failure modes), how a dead or stalled picker
replica is taken out, and the model-aware fallback the fail-open mode relies on."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from ops.envoy import (
    ADMIN_SOCKET,
    DESTINATION,
    EPP_CLUSTER,
    HEALTH_PATH,
    MODEL_KEY,
    SUBSET_FILTER,
    EnvoyOptions,
    FailureMode,
    PickerTransport,
    envoy_config,
    internal_header_pattern,
    main,
    parse_args,
)
from services.gateway.pool import eds_document
from services.gateway.protocol import (
    CHECK_PREFIX,
    DEFAULT_SOCKET_DIR,
    GRPC_SOCKET,
    MODELS_PATH,
    PICK_ID_HEADER,
    PICKER_IDLE_TIMEOUT_S,
    SUBSET_KEY,
    SUBSET_NAMESPACE,
    authz_status,
)
from shared.core.routing import Endpoint


def _cfg(**kw: Any) -> dict[str, Any]:
    return envoy_config(EnvoyOptions(**{"listen_port": 1, "admin_port": 2, "epp_port": (3, 4),
                                        "eds_path": Path("/x/e.json"), **kw}))


def _filters(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    return list(_hcm(cfg)["http_filters"])


def _ext_proc(cfg: dict[str, Any]) -> dict[str, Any]:
    return next(f["typed_config"] for f in _filters(cfg) if f["name"] == "envoy.filters.http.ext_proc")


def _cluster(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in cfg["static_resources"]["clusters"] if c["name"] == name)


@pytest.mark.parametrize(("mode", "allow"), [(FailureMode.FAIL_CLOSE, False), (FailureMode.FAIL_OPEN, True)])
def test_failure_mode_decides_whether_envoy_may_route_without_a_picker(mode: FailureMode, allow: bool) -> None:
    assert _ext_proc(_cfg(failure_mode=mode))["failure_mode_allow"] is allow


def test_fail_close_is_the_default_as_in_gie() -> None:
    assert EnvoyOptions(listen_port=1, admin_port=2, epp_port=3, eds_path=Path("e")).failure_mode is \
        FailureMode.FAIL_CLOSE
    assert [m.value for m in FailureMode] == ["FailClose", "FailOpen"]  # GIE's spelling


def test_an_ext_proc_stream_refused_or_reset_before_its_answer_is_retried_on_another_replica() -> None:
    retry = _ext_proc(_cfg(epp_retries=3))["grpc_service"]["retry_policy"]
    assert retry["num_retries"] == 3
    assert {"connect-failure", "reset", "unavailable"} <= set(retry["retry_on"].split(","))
    assert retry["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"


def test_picker_replicas_are_grpc_health_checked_and_ejected_on_a_refused_connection() -> None:
    epp = _cluster(_cfg(epp_health_interval_s=0.1), EPP_CLUSTER)
    hc = epp["health_checks"][0]
    assert "grpc_health_check" in hc and hc["interval"] == "0.1s" and hc["no_traffic_interval"] == "0.1s"
    od = epp["outlier_detection"]
    assert od["split_external_local_origin_errors"] and od["consecutive_local_origin_failure"] == 1
    assert [e["endpoint"]["address"]["socket_address"]["port_value"]
            for e in epp["load_assignment"]["endpoints"][0]["lb_endpoints"]] == [3, 4]


def test_the_fallback_without_a_picker_list_stays_within_the_request_model() -> None:
    cfg = _cfg()
    names = [f["name"] for f in _filters(cfg)]
    assert names.index("envoy.filters.http.json_to_metadata") < names.index("envoy.filters.http.ext_proc")
    override = _cluster(cfg, "gantry_engines")["load_balancing_policy"]["policies"][0]["typed_extension_config"]
    subset = override["typed_config"]["fallback_policy"]["policies"][0]["typed_extension_config"]["typed_config"]
    assert subset["subset_selectors"] == [{"keys": [MODEL_KEY]}]
    assert subset["fallback_policy"] == "NO_FALLBACK"  # no server of that model: refused, not sent elsewhere


def test_eds_endpoints_carry_their_model_for_the_fallback() -> None:
    doc = eds_document([Endpoint(id="a", address="127.0.0.1:8001", model="m1")], 1)
    ep = doc["resources"][0]["endpoints"][0]["lb_endpoints"][0]
    assert ep["metadata"]["filter_metadata"]["envoy.lb"] == {MODEL_KEY: "m1"}


def _hcm(cfg: dict[str, Any]) -> dict[str, Any]:
    return dict(cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"])


def test_access_log_records_response_flags_and_details_when_asked() -> None:
    assert _hcm(_cfg())["access_log"] == []
    fmt = str(_hcm(_cfg(access_log=Path("/x/a.log")))["access_log"])
    assert "%RESPONSE_FLAGS%" in fmt and "%RESPONSE_CODE_DETAILS%" in fmt and "/x/a.log" in fmt


def test_cli_refuses_an_unknown_failure_mode(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--epp-port", "1", "--eds-path", "e.json", "--failure-mode", "FailSometimes"])
    assert exit_.value.code == 2 and "FailSometimes" in capsys.readouterr().err


def test_without_ext_proc_only_the_picker_filter_is_left_out() -> None:
    with_picker = [f["name"] for f in _filters(_cfg())]
    alone = [f["name"] for f in _filters(_cfg(ext_proc=False))]
    assert "envoy.filters.http.ext_proc" in with_picker
    assert alone == [n for n in with_picker if n != "envoy.filters.http.ext_proc"]


def test_the_ext_authz_transport_sends_body_and_headers_in_one_http_check_and_forwards_the_destination() -> None:
    cfg = _cfg(transport=PickerTransport.EXT_AUTHZ, max_body_bytes=1024)
    names = [f["name"] for f in _filters(cfg)]
    assert "envoy.filters.http.ext_authz" in names and "envoy.filters.http.ext_proc" not in names
    authz = next(f["typed_config"] for f in _filters(cfg) if f["name"] == "envoy.filters.http.ext_authz")
    assert authz["http_service"]["server_uri"]["cluster"] == EPP_CLUSTER
    assert authz["http_service"]["path_prefix"] == CHECK_PREFIX  # checks never collide with the picker's own paths
    retry = authz["http_service"]["retry_policy"]  # a check a dead replica refused goes to another
    assert "connect-failure" in retry["retry_on"] and retry["retry_host_predicate"]
    assert authz["with_request_body"] == {"max_request_bytes": 1024, "allow_partial_message": False,
                                          "pack_as_bytes": True}
    # the header the engines cluster's override_host policy reads goes upstream with the allowed request
    allowed = authz["http_service"]["authorization_response"]["allowed_upstream_headers"]["patterns"]
    assert {"exact": DESTINATION} in allowed
    sent = {p["exact"] for p in authz["allowed_headers"]["patterns"]}
    assert {"x-request-id", "x-gantry-priority", "x-gateway-inference-fairness-id", "x-session-id"} <= sent
    assert names.index("envoy.filters.http.ext_authz") < names.index("envoy.filters.http.router")


def test_the_ext_authz_picker_cluster_speaks_http1_and_is_health_checked_over_http() -> None:
    epp = _cluster(_cfg(transport=PickerTransport.EXT_AUTHZ), EPP_CLUSTER)
    proto = epp["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http_protocol_options" in proto["explicit_http_config"]
    assert epp["health_checks"][0]["http_health_check"] == {"path": HEALTH_PATH}


@pytest.mark.parametrize("failure_mode", list(FailureMode))
def test_the_ext_authz_transport_keeps_the_failure_mode(failure_mode: FailureMode) -> None:
    cfg = _cfg(transport=PickerTransport.EXT_AUTHZ, failure_mode=failure_mode)
    authz = next(f["typed_config"] for f in _filters(cfg) if f["name"] == "envoy.filters.http.ext_authz")
    assert authz["failure_mode_allow"] is (failure_mode is FailureMode.FAIL_OPEN)


def _hcm(cfg: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return out


def test_the_ext_authz_transport_sends_every_request_end_to_every_picker_replica_over_grpc() -> None:
    cfg = _cfg(transport=PickerTransport.EXT_AUTHZ, als_port=(5, 6), als_flush_s=0.02)
    logs = [a for a in _hcm(cfg)["access_log"] if a["name"] == "envoy.access_loggers.http_grpc"]
    assert len(logs) == 2
    for i, (log, port) in enumerate(zip(logs, (5, 6), strict=True)):
        common = log["typed_config"]["common_config"]
        assert common["buffer_flush_interval"] == "0.02s"
        assert log["typed_config"]["additional_request_headers_to_log"] == [PICK_ID_HEADER]
        cluster = _cluster(cfg, common["grpc_service"]["envoy_grpc"]["cluster_name"])
        addr = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        assert addr["socket_address"]["port_value"] == port, i
    assert not [a for a in _hcm(_cfg())["access_log"] if a["name"] == "envoy.access_loggers.http_grpc"]


def test_the_ext_authz_transport_routes_models_to_the_picker_unchecked() -> None:
    routes = _hcm(_cfg(transport=PickerTransport.EXT_AUTHZ))["route_config"]["virtual_hosts"][0]["routes"]
    assert routes[0]["match"] == {"path": MODELS_PATH} and routes[0]["route"]["cluster"] == EPP_CLUSTER
    assert routes[0]["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["disabled"] is True
    assert "connect-failure" in routes[0]["route"]["retry_policy"]["retry_on"]  # a replica not listening: the next
    assert len(_hcm(_cfg())["route_config"]["virtual_hosts"][0]["routes"]) == 1  # ext_proc answers it itself


def test_the_ext_authz_transport_restores_the_pickers_shifted_5xx_refusals() -> None:
    mappers = _hcm(_cfg(transport=PickerTransport.EXT_AUTHZ))["local_reply_config"]["mappers"]
    restored = {m["filter"]["and_filter"]["filters"][1]["status_code_filter"]["comparison"]["value"]["default_value"]:
                m["status_code"] for m in mappers}
    assert restored[authz_status(503)] == 503 and restored[authz_status(504)] == 504
    assert all(m["filter"]["and_filter"]["filters"][0] == {"response_flag_filter": {"flags": ["UAEX"]}}
               for m in mappers)
    assert "local_reply_config" not in _hcm(_cfg())


def test_another_processing_mode_replaces_the_pickers_exchange() -> None:
    mode = {"request_header_mode": "SKIP", "request_body_mode": "BUFFERED"}
    assert _ext_proc(_cfg(ext_proc_mode=mode))["processing_mode"] == mode


def test_envoy_closes_an_idle_engine_connection_before_the_engine_would() -> None:
    engines = _cluster(_cfg(), "gantry_engines")
    opts = engines["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert opts["explicit_http_config"] == {"http_protocol_options": {}}  # HTTP/1.1, as before
    idle = float(opts["common_http_protocol_options"]["idle_timeout"].rstrip("s"))
    assert 0 < idle < 5.0  # uvicorn's (and vLLM's) keep-alive: a request on a connection it is closing fails


def test_whatever_the_pickers_idle_close_cuts_before_its_answer_is_sent_again() -> None:
    """A check, a ``/v1/models`` or an ext_proc stream written on a connection the picker is closing idle (its idle
    timeout set below Envoy's) is reset (HTTP/1.1) or refused (grpc's GOAWAY): ``reset`` / ``refused-stream`` send
    it again (tests/integration/test_gateway_idle.py: without them the client gets a 500)."""
    authz = _cfg(transport=PickerTransport.EXT_AUTHZ)
    check = next(f["typed_config"] for f in _filters(authz) if f["name"] == "envoy.filters.http.ext_authz")
    models = _hcm(authz)["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    stream = _ext_proc(_cfg())["grpc_service"]
    for retry in (check["http_service"]["retry_policy"], models["retry_policy"]):
        assert "reset" in retry["retry_on"].split(",")  # not reset-before-request: the request was sent
    assert {"reset", "refused-stream"} <= set(stream["retry_policy"]["retry_on"].split(","))


def _idle_timeout(cluster: dict[str, Any]) -> float:
    opts = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    return float(opts["common_http_protocol_options"]["idle_timeout"].rstrip("s"))


@pytest.mark.parametrize("transport", list(PickerTransport))
@pytest.mark.parametrize("picker_idle_s", [1.0, PICKER_IDLE_TIMEOUT_S])
def test_envoy_closes_an_idle_picker_connection_well_before_the_picker_would(transport: PickerTransport,
                                                                            picker_idle_s: float) -> None:
    cfg = _cfg(transport=transport, als_port=(5, 6), picker_idle_timeout_s=picker_idle_s)
    names = [EPP_CLUSTER, *(["gantry_als_0", "gantry_als_1"] if transport is PickerTransport.EXT_AUTHZ else [])]
    for name in names:  # checks (or ext_proc streams) and the access-log streams
        assert 0 < _idle_timeout(_cluster(cfg, name)) <= picker_idle_s / 2, name


def test_the_cli_takes_the_pickers_idle_timeout_and_defaults_to_the_pickers_default() -> None:
    assert parse_args(["--eds-path", "e.json"])[0].picker_idle_timeout_s == PICKER_IDLE_TIMEOUT_S
    o, _ = parse_args(["--eds-path", "e.json", "--picker-idle-timeout-s", "8"])
    assert _idle_timeout(_cluster(envoy_config(o), EPP_CLUSTER)) == 4.0


@pytest.mark.parametrize("bad", ["0", "nan", "inf", "-1", "0.0001", "1e308"])
def test_a_picker_idle_timeout_out_of_the_pickers_own_range_is_refused_in_one_line(
        bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        parse_args(["--eds-path", "e.json", "--picker-idle-timeout-s", bad])
    assert refused.value.code == 2
    assert "--picker-idle-timeout-s must be between" in capsys.readouterr().err


def _addresses(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["endpoint"]["address"] for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]


def test_a_picker_given_as_a_path_is_reached_on_its_unix_socket_and_a_port_on_tcp() -> None:
    sock = Path("/run/p/epp.sock")
    cfg = _cfg(epp_port=(sock, 7))
    assert _addresses(_cluster(cfg, EPP_CLUSTER)) == [
        {"pipe": {"path": "/run/p/epp.sock"}}, {"socket_address": {"address": "127.0.0.1", "port_value": 7}}]
    authz = _cfg(transport=PickerTransport.EXT_AUTHZ, epp_port=Path("/p/authz.sock"), als_port=sock)
    assert _addresses(_cluster(authz, EPP_CLUSTER)) == [{"pipe": {"path": "/p/authz.sock"}}]
    assert _addresses(_cluster(authz, "gantry_als_0")) == [{"pipe": {"path": "/run/p/epp.sock"}}]


def test_the_cli_reaches_the_picker_on_its_default_unix_socket_unless_given_a_port() -> None:
    o, _ = parse_args(["--eds-path", "e.json"])
    assert o.epp_ports == (Path(DEFAULT_SOCKET_DIR).resolve() / GRPC_SOCKET,) and o.als_ports == ()
    o, _ = parse_args(["--eds-path", "e.json", "--transport", "ext_authz", "--socket-dir", "/a", "--socket-dir", "/b"])
    assert o.epp_ports == (Path("/a/authz.sock"), Path("/b/authz.sock"))
    assert o.als_ports == (Path("/a/epp.sock"), Path("/b/epp.sock"))
    o, _ = parse_args(["--eds-path", "e.json", "--epp-port", "9002"])
    assert o.epp_ports == (9002,)


def test_the_cli_refuses_a_socket_directory_and_a_port_together(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--eds-path", "e.json", "--epp-port", "1", "--socket-dir", "/a"])
    assert "exclude each other" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "stripped"), [
    ("x-gantry-pick-id", True), ("x-gantry-endpoints", True), ("x-gantry-", True), ("x-gantry-prio", True),
    ("x-gantry-priorityx", True), ("x-gantry-anything-new", True),
    ("x-gantry-priority", False), ("x-request-id", False), ("x-session-id", False),
    ("x-gateway-inference-fairness-id", False), ("content-type", False)])
def test_the_gateways_own_x_gantry_headers_are_stripped_but_the_clients_priority_is_kept(name: str,
                                                                                        stripped: bool) -> None:
    assert bool(re.fullmatch(internal_header_pattern(), name)) is stripped


@pytest.mark.parametrize("transport", list(PickerTransport))
def test_client_sent_gateway_headers_are_removed_before_any_other_filter(transport: PickerTransport) -> None:
    first = _filters(_cfg(transport=transport))[0]
    assert first["name"] == "envoy.filters.http.header_mutation"
    rules = [m["remove_on_match"]["key_matcher"] for m in first["typed_config"]["mutations"]["request_mutations"]]
    assert rules == [{"safe_regex": {"regex": internal_header_pattern()}}, {"prefix": DESTINATION},
                     {"prefix": "x-envoy-"}]
    assert len(internal_header_pattern()) < 200  # Envoy refuses an RE2 program over 100 instructions


@pytest.mark.parametrize(("hint", "value"), [(("10.0.0.1:8000", "[fd00::5]:8000"), "10.0.0.1:8000,[fd00::5]:8000"),
                                            ((), "")])
def test_a_fixed_subset_reaches_the_ext_authz_check_as_a_header_only_the_gateway_sets(hint: tuple[str, ...],
                                                                                       value: str) -> None:
    """ext_authz sends its check no metadata: the hint is the header of the same key, set after the first filter
    removes a client's own (its prefix is the destination's), and forwarded to the check. An empty hint is kept
    as an empty header: no endpoint, not the whole pool."""
    assert SUBSET_KEY.startswith(DESTINATION)  # a client's is removed first
    filters = _filters(_cfg(transport=PickerTransport.EXT_AUTHZ, subset_hint=hint))
    names = [f["name"] for f in filters]
    assert names[0] == "envoy.filters.http.header_mutation"  # the client's gateway headers removed
    assert names.index(SUBSET_FILTER) == names.index("envoy.filters.http.ext_authz") - 1
    assert filters[names.index(SUBSET_FILTER)]["typed_config"]["@type"].endswith("header_mutation.v3.HeaderMutation")
    (rule,) = filters[names.index(SUBSET_FILTER)]["typed_config"]["mutations"]["request_mutations"]
    assert rule["append"]["header"] == {"key": SUBSET_KEY, "value": value} and rule["append"]["keep_empty_value"]
    authz = filters[names.index("envoy.filters.http.ext_authz")]["typed_config"]
    assert {"exact": SUBSET_KEY} in authz["allowed_headers"]["patterns"]
    assert "envoy.filters.http.set_metadata" not in names


def test_a_fixed_subset_reaches_the_ext_proc_picker_as_gies_metadata() -> None:
    filters = _filters(_cfg(subset_hint=("10.0.0.1:8000",)))
    meta = next(f["typed_config"] for f in filters if f["name"] == "envoy.filters.http.set_metadata")
    assert meta["metadata"] == [{"metadata_namespace": SUBSET_NAMESPACE, "value": {SUBSET_KEY: ["10.0.0.1:8000"]}}]
    assert SUBSET_NAMESPACE in _ext_proc(_cfg(subset_hint=("10.0.0.1:8000",)))["metadata_options"][
        "forwarding_namespaces"]["untyped"]
    assert SUBSET_FILTER not in [f["name"] for f in filters]


def test_a_client_is_its_connections_peer_and_never_internal_whatever_it_forwards() -> None:
    hcm = _hcm(_cfg())
    assert hcm["use_remote_address"] is True and hcm["xff_num_trusted_hops"] == 0
    assert hcm["internal_address_config"] == {"cidr_ranges": []}


def test_envoys_admin_is_a_unix_socket_only_its_user_may_open_unless_a_port_is_asked_for(tmp_path: Path) -> None:
    o, _ = parse_args(["--eds-path", "e.json", "--workdir", str(tmp_path)])
    assert o.admin_port == tmp_path / ADMIN_SOCKET
    assert envoy_config(o)["admin"]["address"] == {"pipe": {"path": str(tmp_path / ADMIN_SOCKET), "mode": 0o600}}
    o, _ = parse_args(["--eds-path", "e.json", "--admin-port", "9901"])
    assert envoy_config(o)["admin"]["address"] == {"socket_address": {"address": "127.0.0.1", "port_value": 9901}}


@pytest.mark.parametrize(("flag", "request_body"), [((), "BUFFERED"),
                                                   (("--ext-proc-mode", "gie"), "FULL_DUPLEX_STREAMED")])
def test_the_cli_writes_the_buffered_exchange_unless_told_gies(flag: tuple[str, ...], request_body: str,
                                                                       tmp_path: Path) -> None:
    o, _ = parse_args(["--eds-path", str(tmp_path / "e.json"), *flag])
    assert _ext_proc(envoy_config(o))["processing_mode"]["request_body_mode"] == request_body


def test_an_ext_proc_mode_with_the_ext_authz_transport_is_refused(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as err:
        parse_args(["--eds-path", str(tmp_path / "e.json"), "--transport", "ext_authz", "--ext-proc-mode", "gie"])
    assert err.value.code == 2 and "--ext-proc-mode needs --transport ext_proc" in capsys.readouterr().err


def test_envoy_takes_bodies_up_to_the_limit_it_is_given_on_both_sides(tmp_path: Path) -> None:
    o, _ = parse_args(["--eds-path", str(tmp_path / "e.json"), "--max-body-bytes", str(3 << 20)])
    cfg = envoy_config(o)
    assert cfg["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] == 3 << 20
    engines = next(c for c in cfg["static_resources"]["clusters"] if c["name"] == "gantry_engines")
    assert engines["per_connection_buffer_limit_bytes"] == 3 << 20  # kept whole for a retry on the next endpoint


@pytest.mark.parametrize("value", ["0", "-1", str(64 << 20)])
def test_a_body_limit_outside_what_the_picker_reads_is_refused(value: str, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--eds-path", str(tmp_path / "e.json"), "--max-body-bytes", value])
    assert "--max-body-bytes must be between" in capsys.readouterr().err


def test_the_listener_refuses_a_port_another_gateway_serves() -> None:
    # Envoy's Linux default (SO_REUSEPORT) let a second gateway bind the first one's port, the kernel then
    # splitting the connections between two gateways of different models
    listener = _cfg()["static_resources"]["listeners"][0]
    assert listener["enable_reuse_port"] is False


def test_envoy_is_not_started_on_a_port_something_already_serves(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import subprocess

    import ops.envoy

    started: list[object] = []

    class Running:  # stands in for an Envoy that started (the port check would have found the other server)
        returncode = None

        def poll(self) -> None:
            return None

    def popen(args: object, **kw: object) -> Running:
        started.append(args)
        return Running()

    monkeypatch.setattr(subprocess, "Popen", popen)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        opts = EnvoyOptions(listen_port=port, admin_port=tmp_path / "a.sock", epp_port=(3, 4),
                            eds_path=tmp_path / "eds" / "e.json")
        with pytest.raises(ops.envoy.ServerStartError, match=f"port {port} is already in use"):
            ops.envoy.start_envoy(opts, tmp_path / "envoy")
    assert started == []
