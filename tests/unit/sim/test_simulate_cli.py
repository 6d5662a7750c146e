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
