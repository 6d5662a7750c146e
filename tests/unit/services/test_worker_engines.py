"""A fleet's engine servers (``--engines``): the engine spec an instance gets, the load an engine's /metrics
reports and when a DRAINING instance is idle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.workers.__main__ import engine_url, parse
from services.workers.engine_policy import EngineLoad, drain_idle, engine_spec_args, parse_load
from services.workers.engines import server_env
from shared.settings import Settings

SAMPLE = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:num_requests_waiting{engine="1",model_name="m"} 1.0
vllm:num_requests_running_total_not_this 9.0
"""


def test_an_engines_load_is_read_from_its_prometheus_text_summed_over_ranks() -> None:
    assert parse_load(SAMPLE) == EngineLoad(running=3, waiting=3)


def test_a_missing_or_garbled_family_gives_no_load() -> None:
    assert parse_load("vllm:num_requests_running 0\n") is None
    assert parse_load("vllm:num_requests_running nope\nvllm:num_requests_waiting 0\n") is None
    assert parse_load("") is None


def test_the_emulated_servers_own_metrics_parse_to_an_empty_load() -> None:
    from services.engine_server.prometheus import EngineCollector, registry_for, render
    from services.engine_server.server import ServerOptions, build

    _, runner = build(ServerOptions())
    text = render(registry_for(EngineCollector(runner, "m"))).decode()
    assert parse_load(text) == EngineLoad(running=0, waiting=0)


@pytest.mark.parametrize(("load", "age", "idle"), [
    (EngineLoad(0, 0), 0.5, True),
    (EngineLoad(0, 0), 0.1, False),  # too young: a request routed before the drain may still arrive
    (EngineLoad(1, 0), 5.0, False),
    (EngineLoad(0, 1), 5.0, False),
    (None, 5.0, False),  # the engine does not say: only the drain timeout ends it
])
def test_a_draining_instance_is_idle_once_its_engine_is_empty_and_the_drain_has_settled(
    load: EngineLoad | None, age: float, idle: bool
) -> None:
    assert drain_idle(load, age, settle_s=0.5) is idle


def test_a_catalogue_model_gets_its_engine_on_the_workers_gpus() -> None:
    args = engine_spec_args("llama-3.1-8b", "", "H100-SXM-80GB", 2)
    assert args[:4] == ["--model", "llama-3.1-8b-instruct", "--tp", "2"]
    assert args[4] == "--gpu"


def test_a_model_is_found_by_its_source_when_its_name_is_not_in_the_catalogue() -> None:
    assert engine_spec_args("my-llama", "meta-llama/Llama-3.1-8B-Instruct", "H100-SXM-80GB", 1)[1] == (
        "llama-3.1-8b-instruct")


def test_an_unknown_model_gets_the_default_engine_and_an_unknown_gpu_the_default_gpu() -> None:
    assert engine_spec_args("mystery", "org/mystery", "H100-SXM-80GB", 1) == []
    assert "--gpu" not in engine_spec_args("llama-3.1-8b", "", "NoSuchGPU", 1)


def test_a_server_gets_the_engine_url_and_none_of_the_fleets_settings_or_credentials() -> None:
    fleet = {"PATH": "/bin", "PYTHONPATH": "/repo", "GANTRY_DATA_DIR": "/data", "GANTRY_TLS_CA_FILE": "/ca.pem",
             "GANTRY_NATS_URL": "nats://workers:w@h:4222", "GANTRY_REDIS_URL": "redis://workers:w@h:6379/0",
             "GANTRY_IDENTITY": "workers", "GANTRY_CREDENTIALS_FILE": "/run/secrets/c.json",
             "GANTRY_ENGINE_NATS_URL": "nats://engine_server:old@h:4222"}
    assert server_env(fleet, "nats://engine_server:e@h:4222") == {
        "PATH": "/bin", "PYTHONPATH": "/repo", "GANTRY_DATA_DIR": "/data", "GANTRY_TLS_CA_FILE": "/ca.pem",
        "GANTRY_ENGINE_NATS_URL": "nats://engine_server:e@h:4222"}
    assert "GANTRY_ENGINE_NATS_URL" not in server_env(fleet, None)  # no engine URL: the servers do not publish


def test_each_server_gets_its_own_derived_report_key_and_never_the_master() -> None:
    from services.workers.engines import EngineOptions, EngineSupervisor
    from shared.host.report_auth import derive_key

    async def on_exit(_: str, __: int) -> None:
        return None

    master = bytes(range(32))
    fleet = {"PATH": "/bin", "GANTRY_ENGINE_REPORT_MASTER_KEY": master.hex()}
    sup = EngineSupervisor(EngineOptions(report_master=master), on_exit)
    env = server_env(fleet, "nats://h:4222", sup.report_key("i-1"))
    assert env["GANTRY_ENGINE_REPORT_KEY"] == derive_key(master, "i-1").hex()
    assert master.hex() not in env.values()
    assert sup.report_key("i-1") != sup.report_key("i-2")
    unsigned = EngineSupervisor(EngineOptions(), on_exit)
    assert "GANTRY_ENGINE_REPORT_KEY" not in server_env(fleet, "nats://h:4222", unsigned.report_key("i-1"))


def test_an_engine_server_reads_its_report_key_from_the_environment_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.engine_server.server import parse_args

    monkeypatch.setenv("GANTRY_ENGINE_REPORT_KEY", "ab" * 32)
    assert parse_args([]).report_key == bytes.fromhex("ab" * 32)
    monkeypatch.delenv("GANTRY_ENGINE_REPORT_KEY")
    assert parse_args([]).report_key is None
    monkeypatch.setenv("GANTRY_ENGINE_REPORT_KEY", "not-hex")
    with pytest.raises(SystemExit):
        parse_args([])


def test_an_engine_server_reads_its_nats_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.engine_server.server import ServerOptions, build_engine, parse_args, startup_line

    monkeypatch.setenv("GANTRY_ENGINE_NATS_URL", "nats://engine_server:e-s3cret@h:4222")
    opts = parse_args([])
    assert opts.nats_url == "nats://engine_server:e-s3cret@h:4222"
    monkeypatch.delenv("GANTRY_ENGINE_NATS_URL")
    assert parse_args([]).nats_url is None
    from services.engine_server.api import ServerInfo

    info = ServerInfo(served_model_name="m", model_path="", catalog_model="c", gpu="g", tp=1, speedup=1.0,
                      max_model_len=8, url="http://h", created=0, lora_modules=(), instance_id="i")
    line = startup_line(opts, info, build_engine(ServerOptions(num_gpu_blocks=8)))
    assert line.endswith("publishing on NATS nats://h:4222")


def test_engines_are_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GANTRY_ENGINE_NATS_URL", raising=False)
    assert parse([]).engines is False
    on = parse(["--engines", "--engine-nats-url", "nats://127.0.0.1:4222"])
    assert on.engines and on.engine_nats_url == "nats://127.0.0.1:4222"


def test_the_engine_identity_secret_comes_from_the_environment_never_the_fleet_command_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GANTRY_ENGINE_NATS_URL", "nats://engine_server:x@127.0.0.1:4222")
    assert parse(["--engines"]).engine_nats_url == "nats://engine_server:x@127.0.0.1:4222"
    assert parse([]).engine_nats_url is None  # no engines, nothing lent (and no credentials file read)
    with pytest.raises(SystemExit) as refused:
        parse(["--engines", "--engine-nats-url", "nats://engine_server:x@127.0.0.1:4222"])
    assert refused.value.code != 0
    message = str(refused.value.code)
    assert "GANTRY_ENGINE_NATS_URL" in message and "\n" not in message and "x@" not in message


def test_a_compose_fleet_lends_its_servers_the_engine_identity_from_the_credentials_file(tmp_path: Path) -> None:
    creds = tmp_path / "credentials.json"
    creds.write_text(json.dumps({"identities": {"engine_server": "e-secret", "workers": "w-secret"}}))
    settings = Settings(nats_url="nats://workers:w-secret@nats:4222", credentials_file=str(creds))
    assert engine_url(settings) == "nats://engine_server:e-secret@nats:4222"
    assert engine_url(Settings(nats_url="nats://workers:w@nats:4222")) == "nats://nats:4222"  # no file named


@pytest.mark.parametrize("text", [
    "vllm:num_requests_running NaN\nvllm:num_requests_waiting 0\n",
    "vllm:num_requests_running +Inf\nvllm:num_requests_waiting 0\n",
    "vllm:num_requests_running -3\nvllm:num_requests_waiting 0\n",
    "vllm:num_requests_running{a=\"1\" 0\nvllm:num_requests_waiting 0\n",
])
def test_a_non_finite_negative_or_malformed_count_gives_no_load(text: str) -> None:
    assert parse_load(text) is None


def test_a_sample_with_a_timestamp_is_read_by_its_value() -> None:
    text = "vllm:num_requests_running 2 1700000000000\nvllm:num_requests_waiting 0 1700000000000\n"
    assert parse_load(text) == EngineLoad(running=2, waiting=0)


def test_a_label_without_an_equals_sign_is_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        parse(["--label", "gpu-pool"])
    assert refused.value.code == 2
    assert "--label takes key=value, got 'gpu-pool'" in capsys.readouterr().err


@pytest.mark.parametrize("window", ["nan", "inf", "-1"])
def test_a_sync_window_that_is_not_a_finite_duration_is_refused_in_one_line(
    window: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as refused:
        parse(["--sync-window", window])
    assert refused.value.code == 2
    assert "--sync-window is a finite duration in seconds" in capsys.readouterr().err
