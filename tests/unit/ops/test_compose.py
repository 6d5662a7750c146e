"""docker-compose.yml runs what `gantry up` runs, configured like shared/settings.py says.

No Docker engine runs on our machines, so the file is validated structurally: its services exist,
their commands are the service commands and name importable modules, and every environment variable,
port and password agrees with the settings module and with the server commands.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from ops.auth import COMPOSE_FILES, permissions, write_compose_secrets
from ops.stack import (
    ENVOY_CHILD,
    PICKER_CHILD,
    PLACEMENT_SERVICES,
    WORKERS_SERVICE,
    GatewayPorts,
    LocalStack,
    WorkerFleet,
    envoy_argv,
    picker_argv,
    worker_argv,
)
from services import SERVICE_COMMANDS, WORKERS_COMMAND
from services.gateway.protocol import GRPC_SOCKET
from shared.paths import REPO_ROOT
from shared.settings import Settings

COMPOSE = REPO_ROOT / "docker-compose.yml"
GANTRY_SERVICES = (*PLACEMENT_SERVICES, WORKERS_SERVICE)
PATH_VARIABLES = {"GANTRY_DATA_DIR", "GANTRY_HOME"}  # read by shared/paths.py, not by Settings
INTERPOLATION = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Expand ``${VAR}`` / ``${VAR:-default}`` the way compose does (``$$`` is a literal ``$``)."""
    env = env or {}
    return INTERPOLATION.sub(lambda m: env.get(m.group(1), m.group(2) or ""), value).replace("$$", "$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def env_of(compose: dict[str, Any], service: str) -> dict[str, str]:
    return {k: interpolate(str(v)) for k, v in compose["services"][service]["environment"].items()}


METRICS_PROFILE = {"prometheus", "grafana"}


def test_compose_declares_servers_placement_services_and_workers(compose: dict[str, Any]) -> None:
    default = {name for name, svc in compose["services"].items() if not svc.get("profiles")}
    assert default == {"credentials", "nats", "redis", "streams", *GANTRY_SERVICES, PICKER_CHILD, ENVOY_CHILD}


def test_the_metrics_profile_adds_prometheus_and_grafana_only(compose: dict[str, Any]) -> None:
    profiled = {name: svc["profiles"] for name, svc in compose["services"].items() if svc.get("profiles")}
    assert profiled == {name: ["metrics"] for name in METRICS_PROFILE}


@pytest.mark.parametrize("service", PLACEMENT_SERVICES)
def test_placement_service_command_is_the_one_gantry_up_runs(compose: dict[str, Any], service: str) -> None:
    assert compose["services"][service]["command"] == list(SERVICE_COMMANDS[service])


def test_workers_command_is_the_one_gantry_up_runs_for_the_same_fleet(compose: dict[str, Any]) -> None:
    command = compose["services"][WORKERS_SERVICE]["command"]
    fleet = WorkerFleet(
        count=int(command[command.index("--count") + 1]),
        gpus=int(command[command.index("--gpus") + 1]),
        gpu_type=command[command.index("--gpu-product") + 1],
        engines="--engines" in command,
    )
    expected = worker_argv(fleet, WORKERS_COMMAND)
    assert command == ["python", *expected[1:]]


@pytest.mark.parametrize("service", GANTRY_SERVICES)
def test_service_command_runs_an_importable_module(compose: dict[str, Any], service: str) -> None:
    command = compose["services"][service]["command"]
    assert command[:2] == ["python", "-m"]
    spec = importlib.util.find_spec(command[2])
    assert spec is not None, f"{command[2]} is not importable"
    if spec.submodule_search_locations:  # a package runs through its __main__
        assert importlib.util.find_spec(f"{command[2]}.__main__") is not None


@pytest.mark.parametrize("service", GANTRY_SERVICES)
def test_every_environment_variable_is_a_setting(compose: dict[str, Any], service: str) -> None:
    fields = {f"GANTRY_{name.upper()}" for name in Settings.model_fields}
    unknown = set(env_of(compose, service)) - fields - PATH_VARIABLES
    assert not unknown, f"{service} sets variables Settings does not read: {sorted(unknown)}"


@pytest.mark.parametrize("service", GANTRY_SERVICES)
def test_environment_validates_as_settings(compose: dict[str, Any], service: str, monkeypatch) -> None:
    for key, value in env_of(compose, service).items():
        monkeypatch.setenv(key, value)
    Settings()


# What every deployment must pin explicitly: where the servers are and the liveness timings that the
# services and the workers have to agree on. Other settings may be left to their shared defaults.
PINNED = ("nats_url", "redis_url", "heartbeat_interval_s", "not_ready_after_s", "reschedule_after_s",
          "drain_timeout_s", "profile")


@pytest.mark.parametrize("service", GANTRY_SERVICES)
def test_connection_and_liveness_settings_are_pinned(compose: dict[str, Any], service: str) -> None:
    assert {f"GANTRY_{name.upper()}" for name in PINNED} <= set(env_of(compose, service))


def test_services_share_one_environment_but_their_identity(compose: dict[str, Any]) -> None:
    envs = [{k: v for k, v in env_of(compose, s).items() if k != "GANTRY_IDENTITY"} for s in GANTRY_SERVICES]
    assert all(env == envs[0] for env in envs)


@pytest.mark.parametrize("service", GANTRY_SERVICES)
def test_each_service_speaks_as_its_own_identity(compose: dict[str, Any], service: str) -> None:
    identity = env_of(compose, service)["GANTRY_IDENTITY"]
    assert identity == service
    assert permissions(identity).publish  # a role ops.auth knows and grants rights to


def test_no_secret_is_written_in_the_compose_file() -> None:
    text = COMPOSE.read_text()
    assert "requirepass" not in text and "gantry-dev" not in text and "password" not in text.lower()
    for service in ("filter", "reconciler"):
        url = urlsplit(env_of(yaml.safe_load(text), service)["GANTRY_REDIS_URL"])
        assert url.password is None and url.username is None


def test_published_ports_listen_on_loopback_only(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_credentials_are_generated_into_the_volume_servers_and_services_read(compose: dict[str, Any]) -> None:
    job = compose["services"]["credentials"]
    assert job["command"][:4] == ["python", "-m", "ops.auth", "compose"]
    out = job["command"][job["command"].index("--out") + 1]
    volume = next(v.split(":")[0] for v in job["volumes"] if v.split(":")[1] == out)
    for name in ("nats", "redis", *GANTRY_SERVICES):
        mounts = {v.split(":")[0]: v.split(":")[1] for v in compose["services"][name]["volumes"]}
        assert mounts.get(volume) == out, f"{name} does not mount the credentials volume at {out}"
    assert env_of(compose, "filter")["GANTRY_CREDENTIALS_FILE"] == f"{out}/{COMPOSE_FILES[0]}"
    for server in ("nats", "redis"):
        assert compose["services"][server]["depends_on"]["credentials"]["condition"] == (
            "service_completed_successfully")


def test_compose_secrets_are_generated_once(tmp_path: Path) -> None:
    assert write_compose_secrets(tmp_path)
    first = (tmp_path / COMPOSE_FILES[0]).read_text()
    assert not write_compose_secrets(tmp_path)
    assert (tmp_path / COMPOSE_FILES[0]).read_text() == first
    assert "authorization" in (tmp_path / "nats.conf").read_text()
    assert "user default off" in (tmp_path / "redis.conf").read_text()
    assert len(bytes.fromhex(json.loads(first)["engine_report_key"])) == 32  # the fleet's and gateway's


def test_compose_secrets_made_before_reports_were_signed_get_a_report_key(tmp_path: Path) -> None:
    assert write_compose_secrets(tmp_path)
    path = tmp_path / COMPOSE_FILES[0]
    doc = json.loads(path.read_text())
    del doc["engine_report_key"]
    path.write_text(json.dumps(doc))
    assert not write_compose_secrets(tmp_path)
    again = json.loads(path.read_text())
    assert again["identities"] == doc["identities"] and again["engine_report_key"]


def test_gantry_up_children_get_the_same_variables(compose: dict[str, Any]) -> None:
    stack_vars = {k for k in LocalStack(Settings(), home=Path("unused")).child_env() if k.startswith("GANTRY_")}
    assert set(env_of(compose, "filter")) - PATH_VARIABLES <= stack_vars


def test_nats_url_points_at_the_nats_service_port(compose: dict[str, Any]) -> None:
    url = urlsplit(env_of(compose, "filter")["GANTRY_NATS_URL"])
    command = compose["services"]["nats"]["command"]
    assert url.hostname == "nats"
    assert str(url.port) == command[command.index("-p") + 1]
    assert f"127.0.0.1:{url.port}:{url.port}" in compose["services"]["nats"]["ports"]


def test_nats_uses_the_repo_config_with_jetstream_and_authorization(compose: dict[str, Any], tmp_path: Path) -> None:
    command = compose["services"]["nats"]["command"]
    assert command[command.index("-c") + 1] == "/secrets/nats.conf"
    write_compose_secrets(tmp_path)
    rendered = (tmp_path / "nats.conf").read_text()
    assert (REPO_ROOT / "ops/config/nats.conf").read_text().strip() in rendered
    assert "jetstream" in rendered and "authorization" in rendered
    assert "-sd" in command


def test_redis_starts_with_the_generated_acl(compose: dict[str, Any]) -> None:
    url = urlsplit(env_of(compose, "reconciler")["GANTRY_REDIS_URL"])
    command = [interpolate(str(part)) for part in compose["services"]["redis"]["command"]]
    assert url.hostname == "redis"
    assert str(url.port) == command[command.index("--port") + 1]
    assert command[1] == "/secrets/redis.conf"  # a configuration file must come first


def test_redis_persists_with_append_only_file(compose: dict[str, Any]) -> None:
    command = [str(part) for part in compose["services"]["redis"]["command"]]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in compose["services"]["redis"]["volumes"])


@pytest.mark.parametrize("service", ["nats", "redis", *GANTRY_SERVICES])
def test_every_service_has_a_health_check(compose: dict[str, Any], service: str) -> None:
    test = compose["services"][service]["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL")
    if test[:4] == ["CMD", "python", "-m", "ops.healthcheck"]:
        assert test[4] == service


@pytest.mark.parametrize("service", GANTRY_SERVICES)
def test_gantry_services_wait_for_healthy_servers(compose: dict[str, Any], service: str) -> None:
    depends = compose["services"][service]["depends_on"]
    assert {"nats": depends["nats"], "redis": depends["redis"]} == {
        "nats": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }


def test_image_build_file_exists(compose: dict[str, Any]) -> None:
    build = compose["services"]["filter"]["build"]
    assert (REPO_ROOT / build["context"] / build["dockerfile"]).is_file()


# -- start order (issue 17: compose workers did not wait for the services) ----------------------------------


def depends(compose: dict[str, Any], service: str) -> dict[str, str]:
    deps = compose["services"][service].get("depends_on", {})
    assert isinstance(deps, dict), f"{service}: depends_on must name a condition per service"
    return {name: dep["condition"] for name, dep in deps.items()}


def test_workers_start_once_every_placement_service_is_healthy(compose: dict[str, Any]) -> None:
    deps = depends(compose, WORKERS_SERVICE)
    assert {s: deps.get(s) for s in (*PLACEMENT_SERVICES, "nats", "redis")} == dict.fromkeys(
        (*PLACEMENT_SERVICES, "nats", "redis"), "service_healthy"
    )


def test_servers_wait_for_their_credentials(compose: dict[str, Any]) -> None:
    for server in ("nats", "redis"):
        assert depends(compose, server) == {"credentials": "service_completed_successfully"}


def test_whatever_is_waited_on_as_healthy_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name in compose["services"]:
        for dep, condition in depends(compose, name).items():
            assert dep in compose["services"], f"{name} depends on unknown {dep}"
            if condition == "service_healthy":
                assert compose["services"][dep].get("healthcheck"), f"{name} waits on {dep}, which has no healthcheck"


def test_the_start_order_has_no_cycle(compose: dict[str, Any]) -> None:
    order: list[str] = []
    pending = {name: set(depends(compose, name)) for name in compose["services"]}
    while pending:
        ready = sorted(name for name, deps in pending.items() if deps <= set(order))
        assert ready, f"dependency cycle among {sorted(pending)}"
        order += ready
        for name in ready:
            del pending[name]
    assert order.index(WORKERS_SERVICE) > max(order.index(s) for s in PLACEMENT_SERVICES)


# -- the gateway: the picker and Envoy, as `gantry up` starts them ------------------------------------------------


def flags(argv: list[str]) -> dict[str, str]:
    """``--name value`` pairs of a command line."""
    return {a: argv[i + 1] for i, a in enumerate(argv[:-1]) if a.startswith("--") and not argv[i + 1].startswith("--")}


def test_the_gateway_services_run_the_commands_gantry_up_runs(compose: dict[str, Any]) -> None:
    ports = GatewayPorts(listen=8080, admin=Path("/tmp/envoy/admin.sock"), picker=Path("/picker"),
                         eds=Path("/eds/engines.json"))
    for name, ours in ((PICKER_CHILD, picker_argv(ports)), (ENVOY_CHILD, envoy_argv(ports, Path("/tmp/envoy")))):
        command = compose["services"][name]["command"]
        assert command[:3] == ["python", "-m", ours[2]]
        spec = importlib.util.find_spec(command[2])
        assert spec is not None, f"{command[2]} is not importable"
        theirs = flags(command)
        theirs.pop("--listen-host", None)  # in a container Envoy listens on every interface of its namespace
        assert theirs == flags(ours)


def test_the_picker_speaks_as_the_gateway_identity_and_takes_its_pool_from_placement(compose: dict[str, Any]) -> None:
    env = env_of(compose, PICKER_CHILD)
    assert env["GANTRY_IDENTITY"] == "gateway" and permissions("gateway").subscribe
    assert flags(compose["services"][PICKER_CHILD]["command"])["--pool-source"] == "placement"
    assert "--engines" in compose["services"][WORKERS_SERVICE]["command"]


def test_the_gateway_lives_in_the_workers_network_namespace_and_starts_after_them(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in (PICKER_CHILD, ENVOY_CHILD):
        assert services[name]["network_mode"] == f"service:{WORKERS_SERVICE}"  # engines and picker on loopback
        assert "gantry-eds:/eds" in services[name]["volumes"]
    assert depends(compose, PICKER_CHILD)[WORKERS_SERVICE] == "service_healthy"
    assert depends(compose, ENVOY_CHILD) == {PICKER_CHILD: "service_healthy"}
    assert "127.0.0.1:8080:8080" in services[WORKERS_SERVICE]["ports"]


def test_the_picker_and_envoys_admin_are_reached_by_no_other_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    picker, envoy = (flags(services[n]["command"]) for n in (PICKER_CHILD, ENVOY_CHILD))
    # no TCP listener in the workers' namespace, where the fleet and every engine server run
    assert not {"--grpc-port", "--http-port"} & set(picker) and not {"--epp-port", "--admin-port"} & set(envoy)
    assert picker["--socket-dir"] == envoy["--socket-dir"] == "/picker"
    mounting = sorted(n for n, svc in services.items() if any(str(v).startswith("gantry-picker:")
                                                               for v in svc.get("volumes", [])))
    assert mounting == sorted([PICKER_CHILD, ENVOY_CHILD])
    # the admin socket lives in Envoy's own container (its workdir), mounted nowhere
    assert Path(envoy["--admin-socket"]).parent == Path(envoy["--workdir"])
    assert envoy["--admin-socket"] in " ".join(services[ENVOY_CHILD]["healthcheck"]["test"])


def test_envoy_starts_only_once_the_picker_listens(compose: dict[str, Any]) -> None:
    socket_dir = flags(compose["services"][PICKER_CHILD]["command"])["--socket-dir"]
    test = compose["services"][PICKER_CHILD]["healthcheck"]["test"]
    assert test[:5] == ["CMD", "python", "-m", "ops.healthcheck", PICKER_CHILD]
    assert test[5:] == ["--listening", f"{socket_dir}/{GRPC_SOCKET}"]


def test_a_default_service_never_waits_on_a_profiled_one(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        if not svc.get("profiles"):
            assert not set(depends(compose, name)) & METRICS_PROFILE, f"{name} would need --profile metrics"


# -- the metrics profile: Prometheus scrapes every service's /metrics, Grafana shows the dashboards --------------


def host_mounts(compose: dict[str, Any], service: str) -> dict[str, str]:
    """container path -> host path (repository-relative) of a service's bind mounts."""
    mounts = {}
    for volume in compose["services"][service].get("volumes", []):
        host, container = str(volume).split(":")[:2]
        if host.startswith("./"):
            mounts[container] = host[2:]
    return mounts


METRICS_SERVICES = (*PLACEMENT_SERVICES, PICKER_CHILD)  # the picker: the engine reports it refused


def network_host(compose: dict[str, Any], service: str) -> str:
    """The name other containers reach ``service`` by: its own, or the service whose namespace it shares."""
    mode = str(compose["services"][service].get("network_mode", ""))
    return mode.removeprefix("service:") if mode.startswith("service:") else service


def test_prometheus_scrapes_every_service_serving_metrics_on_its_metrics_port(compose: dict[str, Any]) -> None:
    config_path = host_mounts(compose, "prometheus")["/etc/prometheus/prometheus.yml"]
    config = yaml.safe_load((REPO_ROOT / config_path).read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    ports = {s: env_of(compose, s)["GANTRY_METRICS_PORT"] for s in METRICS_SERVICES}
    assert targets == {f"{network_host(compose, s)}:{port}" for s, port in ports.items()}
    assert all(job["metrics_path"] == "/metrics" for job in config["scrape_configs"])


def test_the_gateway_serves_its_metrics_where_prometheus_reaches_it(compose: dict[str, Any]) -> None:
    # set in the gateway's own environment (not only inherited), nonzero, and reached through the workers' name
    assert compose["services"][PICKER_CHILD]["environment"]["GANTRY_METRICS_PORT"] == "9100"
    assert network_host(compose, PICKER_CHILD) == WORKERS_SERVICE
    assert depends(compose, "prometheus")[PICKER_CHILD] == "service_healthy"


def test_grafana_is_provisioned_with_prometheus_and_every_dashboard(compose: dict[str, Any]) -> None:
    mounts = host_mounts(compose, "grafana")
    provisioning = REPO_ROOT / mounts["/etc/grafana/provisioning"]
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [(d["type"], d["url"], d["isDefault"]) for d in sources] == [
        ("prometheus", "http://prometheus:9090", True)
    ]
    prometheus_ports = compose["services"]["prometheus"]["ports"]
    assert any(str(p).endswith(":9090") for p in prometheus_ports)
    providers = yaml.safe_load((provisioning / "dashboards" / "gantry.yml").read_text())["providers"]
    dashboards_in = {p["options"]["path"] for p in providers}
    assert len(dashboards_in) == 1
    dashboards_dir = REPO_ROOT / mounts[dashboards_in.pop()]
    dashboards = sorted(dashboards_dir.glob("*.json"))
    assert dashboards and all(json.loads(d.read_text())["uid"] for d in dashboards)
    home = env_of(compose, "grafana")["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards_dir / Path(home).name).is_file()


def test_grafana_writes_no_secret_and_admits_viewers_only(compose: dict[str, Any]) -> None:
    env = env_of(compose, "grafana")
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert not any("PASSWORD" in key for key in env)


@pytest.mark.parametrize("service", PLACEMENT_SERVICES)
def test_placement_services_wait_for_the_streams_the_admin_provisions(compose: dict[str, Any], service: str) -> None:
    assert depends(compose, service)["streams"] == "service_completed_successfully"
    provisioner = compose["services"]["streams"]
    assert provisioner["command"] == ["python", "-m", "ops.provision"]
    assert env_of(compose, "streams")["GANTRY_IDENTITY"] == "admin"
