"""The picker's options: the staleness bound override and bad values refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.gateway.__main__ import parse_args
from services.gateway.service import router_config
from shared.core.routing import builtin_config


def test_staleness_override_sets_the_data_layer_and_the_saturation_detector() -> None:
    cfg = router_config("default", 3.0)
    assert cfg.data.staleness_s == 3.0 and cfg.admission.detector.staleness_s == 3.0
    assert router_config("default") == builtin_config("default")


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_a_staleness_bound_that_is_not_positive_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="staleness"):
        router_config("default", bad)


def test_capture_options_are_read() -> None:
    opts = parse_args(["--nats-url", "nats://x:1", "--eds-path", "e.json", "--capture", "t.jsonl",
                       "--capture-salt", "s", "--staleness-s", "2"])
    assert opts.capture == Path("t.jsonl") and opts.capture_salt == "s" and opts.staleness_s == 2.0


def test_the_report_master_key_comes_from_the_environment_and_none_means_every_report_taken(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GANTRY_CREDENTIALS_FILE", raising=False)
    monkeypatch.setenv("GANTRY_ENGINE_REPORT_MASTER_KEY", "ab" * 32)
    assert parse_args(["--nats-url", "nats://x:1", "--eds-path", "e.json"]).report_master == bytes.fromhex("ab" * 32)
    monkeypatch.delenv("GANTRY_ENGINE_REPORT_MASTER_KEY")
    assert parse_args(["--nats-url", "nats://x:1", "--eds-path", "e.json"]).report_master is None


def test_connection_bounds_are_read_and_default_to_what_envoys_config_assumes() -> None:
    from services.gateway.protocol import PICKER_IDLE_TIMEOUT_S, PICKER_MAX_CONNECTIONS

    opts = parse_args(["--nats-url", "nats://x:1", "--eds-path", "e.json"])
    assert (opts.idle_timeout_s, opts.max_connections) == (PICKER_IDLE_TIMEOUT_S, PICKER_MAX_CONNECTIONS)
    opts = parse_args(["--nats-url", "nats://x:1", "--eds-path", "e.json", "--idle-timeout-s", "30",
                       "--max-connections", "64"])
    assert (opts.idle_timeout_s, opts.max_connections) == (30.0, 64)


@pytest.mark.parametrize("bad", [["--idle-timeout-s", "0"], ["--idle-timeout-s", "nan"], ["--idle-timeout-s", "inf"],
                                 ["--idle-timeout-s", "-1"], ["--idle-timeout-s", "0.0001"],  # a sweep that spins
                                 ["--idle-timeout-s", "1e308"],  # its milliseconds overflow gRPC's option
                                 ["--max-connections", "0"], ["--max-connections", "-5"],
                                 ["--max-connections", "99999999999999999999"]])
def test_a_connection_bound_that_bounds_nothing_is_refused_in_one_line(bad: list[str],
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--nats-url", "nats://x:1", "--eds-path", "e.json", *bad])
    assert exit_.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert bad[0] in err[-1] and err[-1].startswith("python -m services.gateway: error:")


def test_a_capture_file_that_holds_something_else_stops_the_start_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from services.gateway.__main__ import main

    other = tmp_path / "notes.jsonl"
    other.write_text("not a capture\n")  # appended to, it would have been mixed into the trace
    with pytest.raises(SystemExit) as ended:
        main(["--nats-url", "nats://127.0.0.1:1", "--eds-path", str(tmp_path / "eds.json"), "--capture", str(other)])
    err = capsys.readouterr().err
    assert ended.value.code == 2 and err.startswith("error: ") and "not a capture record" in err
    assert len(err.strip().splitlines()) == 1
