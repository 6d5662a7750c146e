"""``gantry place`` on every shipped example scenario, on a real GGUF file, and on bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ops.cli.main import main
from shared.paths import REPO_ROOT
from tests.unit.placement.helpers import write_gguf

SCENARIOS = REPO_ROOT / "docs" / "scenarios" / "placement"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(["place", *args])
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def place_doc(capsys: pytest.CaptureFixture[str], name: str, *extra: str) -> dict[str, Any]:
    code, out, err = run(capsys, "--scenario", str(SCENARIOS / f"{name}.json"), "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def workers(doc: dict[str, Any]) -> list[str]:
    return [r["worker"] for r in doc["replicas"] if r["placed"]]


def gpus(doc: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    return [(r["worker"], tuple(r["gpu_indexes"])) for r in doc["replicas"] if r["placed"]]


EXPECTATIONS = {
    "18_spread_balanced": lambda d: workers(d) == ["w1", "w2", "w3"],
    "01_spread_three_replicas": lambda d: len(set(workers(d))) == 3 == d["placed"],
    "02_binpack_fills_a_worker": lambda d: workers(d) == ["w2", "w2", "w2"],
    "03_external_vram_use": lambda d: gpus(d) == [("w2", (0,))],
    "04_cordoned_gpu": lambda d: gpus(d) == [("w1", (1,)), ("w2", (1,))],
    "05_tensor_parallel_70b": lambda d: gpus(d) == [("w1", (0, 1, 2, 3)), ("w1", (4, 5, 6, 7))],
    "06_multi_worker": lambda d: d["replicas"][0]["strategy"] == "multi_worker"
    and len(d["replicas"][0]["subordinates"]) == 1,
    "07_gguf_partial_offload": lambda d: d["replicas"][0]["strategy"] == "partial_offload"
    and (d["replicas"][0]["offload_layers"], d["replicas"][0]["total_layers"]) == (33, 48),
    "08_cpu_only": lambda d: gpus(d) == [("cpu2", ())] and d["replicas"][0]["strategy"] == "cpu_only",
    "09_nothing_fits": lambda d: d["placed"] == 0
    and d["replicas"][0]["message"].startswith("needs ≈19.95 GiB VRAM per replica; largest allocatable GPU: 20.00"),
    "10_manual_partitioned": lambda d: len(set(gpus(d))) == 3 and ("w1", (0,)) not in gpus(d),
    "11_manual_overcommit": lambda d: "overcommits" in d["replicas"][0]["overcommit"],
    "12_filters_labels_and_liveness": lambda d: workers(d) == ["w5"] and d["unschedulable"] == 1,
    "13_unknown_model_size": lambda d: d["placed"] == 0 and "size unknown" in d["replicas"][0]["message"],
    "14_gpu_type_selector": lambda d: {w for w in workers(d)} <= {"h1", "h2"}
    and all(len(g) == 2 for _, g in gpus(d)) and d["placed"] == 3,
    "15_embedding_claims_what_it_needs": lambda d: gpus(d) == [("w1", (0,))] * 3,
    "16_model_file_locality": lambda d: workers(d) == ["w3"] and d["replicas"][0]["breakdown"]["locality"] == 5.0,
    "17_cpu_exhausted_worker_avoided": lambda d: gpus(d) == [("w2", (1,))],
    "fragmentation-keeps-gpu-pairs-free": lambda d: gpus(d) == [("w-b", (1,))] * 2 and d["profile"] == "fragmentation",
}


def test_every_shipped_scenario_has_an_expectation():
    shipped = {p.stem for p in SCENARIOS.glob("*.json") if not p.stem.startswith("bad_")}
    assert shipped == set(EXPECTATIONS) and len(shipped) >= 10


@pytest.mark.parametrize("name", sorted(EXPECTATIONS))
def test_shipped_scenario(capsys, name):
    doc = place_doc(capsys, name)
    assert EXPECTATIONS[name](doc), json.dumps(doc["replicas"], indent=1)[:2000]


def test_replicas_flag_overrides_the_scenario(capsys):
    doc = place_doc(capsys, "01_spread_three_replicas", "--replicas", "5")
    assert len(doc["replicas"]) == 5 and doc["placed"] == 5
    assert len(set(workers(doc)[:4])) == 4


def test_exhaustive_reference_path_gives_the_same_document(capsys):
    for name in ("01_spread_three_replicas", "02_binpack_fills_a_worker", "09_nothing_fits"):
        assert place_doc(capsys, name) == place_doc(capsys, name, "--exhaustive")


def test_malformed_scenario_exits_2_with_one_line(capsys):
    code, out, err = run(capsys, "--scenario", str(SCENARIOS / "bad_malformed.json"))
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "'lots' is not a size" in err


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ('{"workers": []}', "invalid scenario"),
        ('{"model": {"name": "m"}, "workers": [{"name": "a"}, {"name": "a"}]}', "duplicate worker names"),
        ('{"model": {"name": "m", "gpu_selector": {"gpu_ids": ["w1"]}}, "workers": []}', "worker:index"),
        ('{"model": {"name": "m", "gpu_selector": {"gpu_ids": ["w1:\u00b2"]}}, "workers": []}', "worker:index"),
        ('{"model": {"name": "m"}, "workers": [], "surprise": 1}', "invalid scenario"),
    ],
)
def test_invalid_scenarios_are_rejected(capsys, tmp_path, text, fragment):
    path = tmp_path / "s.json"
    path.write_text(text)
    code, _, err = run(capsys, "--scenario", str(path))
    assert code == 2 and fragment in err and err.count("\n") == 1


def test_missing_scenario_file_exits_2(capsys, tmp_path):
    code, _, err = run(capsys, "--scenario", str(tmp_path / "nope.json"))
    assert code == 2 and "cannot read scenario" in err


def test_a_real_gguf_file_is_sized_from_its_header(capsys, tmp_path: Path):
    write_gguf(tmp_path / "tiny.gguf", layers=4, layer_shape=(256, 256), dtype=np.float32, other_shape=(64, 64))
    scenario = {"model": {"name": "tiny", "source": "tiny.gguf", "backend": "llama-cpp"},
                "workers": [{"name": "w", "gpus": [{"index": 0, "vram_total": "1GiB"}], "ram_total": "4GiB"}]}
    (tmp_path / "s.json").write_text(json.dumps(scenario))
    code, out, err = run(capsys, "--scenario", str(tmp_path / "s.json"), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["request"]["gguf"]["total_layers"] == 4
    assert doc["request"]["gguf"]["layer_bytes"] == 256 * 256 * 4
    assert doc["replicas"][0]["placed"] is True


def test_profile_file_changes_the_scorers(capsys, tmp_path):
    profile = tmp_path / "packed.yaml"
    profile.write_text("name: packed\nscorers:\n  - name: binpack\n  - name: worker_fill\n")
    doc = place_doc(capsys, "01_spread_three_replicas", "--profile", str(profile))
    assert doc["profile"] == "packed"
    assert set(doc["replicas"][0]["breakdown"]) == {"binpack", "worker_fill"}


def test_bad_profile_file_exits_2(capsys, tmp_path):
    profile = tmp_path / "bad.yaml"
    profile.write_text("scorers:\n  - name: magic\n")
    scenario = str(SCENARIOS / "01_spread_three_replicas.json")
    code, _, err = run(capsys, "--scenario", scenario, "--profile", str(profile))
    assert code == 2 and "unknown scorer 'magic'" in err and err.count("\n") == 1


def test_place_prints_words_by_default_and_json_with_the_flag(capsys):
    code, out, err = run(capsys, "--scenario", str(SCENARIOS / "01_spread_three_replicas.json"))
    assert code == 0, err
    assert not out.lstrip().startswith("{")
    lines = out.splitlines()
    assert lines[1].startswith("each replica needs ") and "GiB VRAM" in lines[1]
    assert [line.split(":")[0] for line in lines[2:5]] == ["replica 1", "replica 2", "replica 3"]
    assert lines[-1] == "placed 3 of 3; nothing committed (dry run)"


def test_place_says_why_a_replica_is_unschedulable(capsys):
    code, out, err = run(capsys, "--scenario", str(SCENARIOS / "09_nothing_fits.json"))
    assert code == 0, err
    assert "replica 1: unschedulable: " in out
    assert out.splitlines()[-1].startswith("placed 0 of ")


def test_default_spread_counts_replicas_and_puts_the_first_on_the_fullest_worker(capsys, tmp_path):
    """What worker_balance is for (GPUStack's spread, the default): w0 is 6/8 used but holds fewer replicas."""
    scenario = json.loads((SCENARIOS / "18_spread_balanced.json").read_text())
    del scenario["profile"]
    (tmp_path / "s.json").write_text(json.dumps(scenario))
    code, out, err = run(capsys, "--scenario", str(tmp_path / "s.json"), "--json")
    assert code == 0, err
    assert workers(json.loads(out))[0] == "w0"


def test_the_shipped_spread_balanced_profile_balances_total_use(capsys):
    profile = REPO_ROOT / "ops" / "config" / "spread-balanced.yaml"
    code, out, err = run(capsys, "--scenario", str(SCENARIOS / "18_spread_balanced.json"), "--json",
                         "--profile", str(profile))
    assert code == 0, err
    assert workers(json.loads(out)) == ["w1", "w2", "w3"]


def test_worker_balance_reference_and_fast_paths_agree(capsys):
    assert place_doc(capsys, "18_spread_balanced") == place_doc(capsys, "18_spread_balanced", "--exhaustive")
