"""``gantry simulate``: friendly names, JSON summary, plot, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ops.cli.main import app, main


def test_simulate_prints_a_json_summary_and_writes_a_plot(tmp_path: Path) -> None:
    png = tmp_path / "lat.png"
    res = CliRunner().invoke(app, [
        "simulate", "--trace", "azure-conv", "--model", "llama-3.1-8b", "--gpu", "H100-SXM-80GB",
        "--replicas", "2", "--router", "least", "--limit", "300", "--json", "--plot", str(png),
    ])
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)
    assert s["completed"] == 300
    assert {"ttft_s", "itl_s", "e2e_s", "throughput", "kv_usage", "preemptions"} <= set(s)
    assert s["setup"]["kv_blocks_per_replica"] == 28_181
    assert png.stat().st_size > 10_000


def test_simulate_table_output_names_the_setup() -> None:
    res = CliRunner().invoke(app, ["simulate", "--trace", "mooncake", "--replicas", "1", "--limit", "30", "--tp", "2"])
    assert res.exit_code == 0, res.output
    assert "(tp 2)" in res.output and "TTFT ms" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "no-such-model"], "unknown model"),
        (["--gpu", "Z9000"], "unknown GPU"),
        (["--router", "random"], "unknown router"),
        (["--trace", "/nonexistent.csv"], "unknown trace"),
        (["--model", "llama-3.1-70b", "--tp", "1"], "does not fit"),
        (["--calibrated", "1,2"], "--calibrated"),
        (["--calibrated", "nan,1,1"], "finite and > 0"),
        (["--replicas", "1" + "0" * 30], "--replicas must be <= "),
        (["--tp", "1024"], "KV blocks exceed"),
        (["--replicas", "1000"], "KV blocks exceed"),
        (["--router", "gantry", "--router-replicas", "1000000000"], "--router-replicas must be between"),
        (["--max-num-batched-tokens", "0"], "max_num_batched_tokens must be >= 1"),
        (["--max-num-seqs", "-1"], "max_num_seqs must be >= 1"),
        (["--time-scale", "nan"], "time scale must be a finite"),
        (["--time-scale", "1e-320"], "arrival time out of range"),
        (["--limit", "0"], "--limit must be >= 1"),
        (["--slo-ttft-ms", "inf"], "--slo-ttft-ms"),
        (["--plot", "."], "is a directory"),
        (["--plot", "lat.nosuchformat"], "cannot write --plot"),
        (["--trace", ""], "--trace is empty"),  # was "cannot read .: Is a directory"
        # the step model's coefficients overflow: 0 requests completed, exit 0, NaN in the JSON
        (["--calibrated", "1e308,1e308,1e-308"], "calibration figures out of range"),
    ],
)
def test_bad_simulate_input_exits_2_with_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--limit", "10", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


@pytest.mark.parametrize("broker_args", [
    ["--broker", "local", "--skew", "0.8"],
    ["--broker", "global", "--skew", "0.8", "--kill", "0@5", "--scheduler", "scheduler_expire_period=2s",
     "--scheduler", "scheduler_sync_period=500ms"],
    ["--broker", "splitwise", "--prefill-nodes", "1"],
    ["--broker", "local", "--router-queue"],
])
def test_simulate_with_a_broker_accounts_for_every_request(broker_args: list[str]) -> None:
    res = CliRunner().invoke(app, ["simulate", "--trace", "azure-conv", "--replicas", "2", "--limit", "200",
                                   "--json", *broker_args])
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)
    assert s["completed"] + s["expired"] + s["rejected"] + s["lost"] == 200 and s["duplicated"] == 0
    assert s["broker"]["mode"] == broker_args[1]


@pytest.mark.parametrize(("args", "message"), [
    (["--broker", "fancy"], "scheduler_name must be one of"),
    (["--broker", "local", "--scheduler", "scheduler_ttl=-3"], "scheduler_ttl"),
    (["--broker", "local", "--scheduler", "ttl"], "KEY=VALUE"),
    (["--broker", "local", "--scheduler", "scheduler_nope=1"], "unknown parameter"),
    (["--broker", "global", "--kill", "x"], "--kill wants NODE@SECONDS"),
    (["--broker", "global", "--kill", "0@nan"], "--kill wants NODE@SECONDS"),
    (["--broker", "local", "--prefill-nodes", "1"], "prefill_nodes needs scheduler_name splitwise"),
    (["--broker", "splitwise", "--kv-gbps", "0"], "--kv-gbps"),
    (["--broker", "splitwise", "--prefill-nodes", "1", "--kv-gbps", "nan"], "--kv-gbps"),
])
def test_bad_broker_options_exit_2_with_one_line(args: list[str], message: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--limit", "10", "--replicas", "2", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_simulate_shows_a_progress_bar_on_stderr_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["simulate", "--trace", "mooncake", "--replicas", "1", "--limit", "200", "--json", "--progress"])
    out, err = capsys.readouterr()
    assert done.value.code == 0, err
    assert json.loads(out)["completed"] == 200  # stdout stays the summary alone
    assert "simulating" in err and "200/200" in err


def test_simulate_draws_no_bar_into_a_pipe_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["simulate", "--trace", "mooncake", "--replicas", "1", "--limit", "50", "--json"])
    _, err = capsys.readouterr()
    assert done.value.code == 0 and "simulating" not in err


def test_a_summary_holding_a_figure_that_is_no_number_is_an_error_not_invalid_json() -> None:
    from ops.cli.errors import CliError
    from ops.cli.simulate import _json

    assert _json({"p50": 1.5}) == '{"p50": 1.5}'
    with pytest.raises(CliError, match="not numbers"):
        _json({"kv_usage": {"mean_busy": float("nan")}})


def test_a_failed_plot_write_leaves_no_partial_file_behind(tmp_path: Path) -> None:
    plot = tmp_path / "lat.png"
    plot.write_bytes(b"previous plot")
    with pytest.raises(SystemExit):
        main(["simulate", "--limit", "10", "--no-progress", "--plot", str(tmp_path / "lat.nosuchformat")])
    assert plot.read_bytes() == b"previous plot" and sorted(p.name for p in tmp_path.iterdir()) == ["lat.png"]
