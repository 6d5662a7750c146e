"""`python -m services.workers` refuses numbers no fleet can run with, in one line, before it connects: a zero
heartbeat interval sent heartbeats back to back, a NaN or infinite VRAM crashed the fleet with a traceback."""

from __future__ import annotations

import pytest

from services.workers.__main__ import parse


@pytest.mark.parametrize("args", [
    ["--count", "-1"], ["--count", "100001"], ["--start-index", "-1"], ["--gpus", "-1"], ["--gpus", "129"],
    ["--vram-gib", "nan"], ["--vram-gib", "0"], ["--vram-gib", "inf"], ["--ram-gib", "-1"],
    ["--heartbeat-interval", "0"], ["--heartbeat-interval", "nan"], ["--heartbeat-interval", "1e9"],
    ["--download-delay", "-1"], ["--start-delay", "inf"], ["--engine-start-timeout", "0"], ["--drain-settle", "nan"],
])
def test_a_number_out_of_range_is_refused_in_one_line(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(args)
    assert exc.value.code == 2
    why = capsys.readouterr().err.strip().splitlines()[-1]  # argparse's usage first, then the one line of why
    assert why.startswith("python -m services.workers: error: " + args[0])


def test_the_shapes_the_stack_and_the_tests_use_are_accepted() -> None:
    cfg = parse(["--count", "4", "--gpus", "2", "--heartbeat-interval", "0.2", "--download-delay", "3"])
    assert cfg.count == 4 and cfg.gpus == 2
    assert parse(["--count", "0", "--gpus", "128", "--start-delay", "0"]).gpus == 128


def _refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        parse(args)
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(("args", "where"), [
    (["--vram-gib", "5000"], "$.gpus[0].vram_total"),  # over the 4 TiB a GPU may report
    (["--ram-gib", "300000"], "$.ram_total"),  # over 256 TiB
    (["--prefix", "a.b"], "$.name"),  # not a DNS-label-like name
    (["--prefix", "x" * 63], "$.name"),  # the index makes it 64 characters
    (["--count", "11", "--prefix", "x" * 62], "$.name"),  # only the last worker's name (x…x10) is too long
    ([arg for i in range(65) for arg in ("--label", f"k{i}=v")], "$.labels"),  # 65 labels
    (["--label", "k=" + "v" * 2000], "$.labels[...]"),  # a value over 1,024 characters
])
def test_a_worker_the_state_would_refuse_is_refused_before_the_fleet_starts(
        args: list[str], where: str, capsys: pytest.CaptureFixture[str]) -> None:
    # such a worker registered nothing and had every heartbeat dead-lettered, while the fleet looked healthy
    why = _refused(args, capsys)
    assert why.startswith("python -m services.workers: error: worker ") and " would be refused: " in why
    assert why.endswith(f"at `{where}`")


def test_a_label_given_twice_is_refused_rather_than_the_last_winning(capsys: pytest.CaptureFixture[str]) -> None:
    why = _refused(["--label", "zone=a", "--label", "zone=b"], capsys)
    assert why == "python -m services.workers: error: --label 'zone' is given more than once"
