"""Hostile command-line input is refused in one line with exit code 2, before anything is read in full or
sent (issue 12, cases 1 and 8): huge counts, huge files, names outside the grammar."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from ops.cli.main import main
from ops.servers import free_port
from shared.core.limits import MAX_REPLICAS, MAX_SPEC_BYTES


@pytest.fixture
def no_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings that point at ports nothing listens on: any command that got as far as connecting fails 1."""
    monkeypatch.setenv("GANTRY_NATS_URL", f"nats://127.0.0.1:{free_port()}")
    monkeypatch.setenv("GANTRY_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")


def gantry(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, err.getvalue()


def refused(args: tuple[str, ...], says: str) -> None:
    code, err = gantry(*args)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert says in err, err


@pytest.mark.usefixtures("no_stack")
@pytest.mark.parametrize(
    "replicas", ["123456789012345678901234567890123456789", "1000000000", str(MAX_REPLICAS + 1)]
)
def test_scale_refuses_a_count_past_the_limit(replicas: str) -> None:
    refused(("scale", "llama-8b", replicas), f"replicas must be between 0 and {MAX_REPLICAS}")


@pytest.mark.usefixtures("no_stack")
@pytest.mark.parametrize(
    "args",
    [("scale", "../../etc/passwd", "1"), ("explain", "m*"), ("instances", "--model", 'a"b'),
     ("events", "--model", "a b")],
    ids=["scale", "explain", "instances", "events"],
)
def test_model_names_outside_the_grammar_are_refused(args: tuple[str, ...]) -> None:
    refused(args, "invalid model name")


@pytest.mark.usefixtures("no_stack")
@pytest.mark.parametrize("target", ["../w0", "w.0", "w>", "w0:99999999999999", "w0:²", "w0:٣"])
def test_cordon_targets_outside_the_grammar_are_refused(target: str) -> None:
    code, err = gantry("cordon", target)
    assert code == 2 and err.count("\n") == 1, err


@pytest.mark.usefixtures("no_stack")
def test_a_spec_file_past_the_size_limit_is_refused_without_reading_it(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with big.open("wb") as out:  # sparse: 100 MB on paper, nothing on disk
        out.write(b"name: m\n")
        out.truncate(100 * 1024 * 1024)
    refused(("deploy", str(big)), f"larger than the limit of {MAX_SPEC_BYTES // (1 << 20)} MiB")


@pytest.mark.usefixtures("no_stack")
@pytest.mark.parametrize(
    ("body", "says"),
    [("name: m\nreplicas: 1000000000\n", "replicas"), ("name: m\nvram_claim: -85899345920\n", "vram_claim"),
     ("name: ../../etc/passwd\n", "name"), ("name: m\nworker_selector: " + "[" * 3000 + "]" * 3000 + "\n", "m"),
     # the reader's position mark was shown as the problem, the problem left out
     ("name: m\x00\nreplicas: 1\n", "unacceptable character #x0000")],
    ids=["replicas", "negative-claim", "name", "deep", "nul"],
)
def test_a_spec_outside_the_limits_is_refused(tmp_path: Path, body: str, says: str) -> None:
    spec = tmp_path / "m.yaml"
    spec.write_text(body)
    refused(("deploy", str(spec)), says)


PLACE_SCENARIO = Path(__file__).resolve().parents[3] / "docs" / "scenarios" / "placement" / "09_nothing_fits.json"

def _placement(**changes: object) -> str:
    doc = json.loads(PLACE_SCENARIO.read_text())
    doc.update(changes)
    return json.dumps(doc)


def _replay(config: dict[str, int], arrival_step: int = 0) -> str:
    request = {"id": "a", "arrival_step": arrival_step, "prompt_token_ids": [1, 2], "max_tokens": 2}
    return json.dumps({"config": config, "requests": [request]})


PLACE, REPLAY = ("place",), ("engine", "replay")


@pytest.mark.parametrize(
    ("command", "body", "says"),
    [
        (PLACE, _placement(replicas=10**9), "replicas must be at most"),
        (PLACE, _placement(now=-1e308), "now must be between 0 and"),
        (PLACE, _placement(workers=[{"name": "w", "gpus": [{"index": 0, "vram_total": "9" * 400 + "GiB"}]}]),
         "too large a size"),
        (PLACE, "[" * 100_000 + "]" * 100_000, "nested too deeply"),
        (REPLAY, _replay({"num_gpu_blocks": 10**9}), "num_gpu_blocks must be <="),
        (REPLAY, _replay({}, arrival_step=10**7), "arrival_step must be between 0 and"),
        # within the decoder's depth, past Python's in the size pass: a 3,000-line RecursionError
        (PLACE, _placement(description="DEEP").replace('"DEEP"', "[" * 700 + "]" * 700), "at `$.description`"),
        # a request that cannot finish before the step limit: a million lines printed, then the error
        (REPLAY, _replay({}, arrival_step=999_999), "needs 3 steps at the least"),
    ],
    ids=["place-replicas", "place-now", "place-size", "place-deep", "replay-pool", "replay-arrival", "place-deep-sizes",
         "replay-too-late"],
)
def test_a_scenario_that_would_hang_or_crash_is_refused(
    tmp_path: Path, command: tuple[str, ...], body: str, says: str
) -> None:
    path = tmp_path / "scenario.json"
    path.write_text(body)
    refused((*command, "--scenario", str(path)), says)


@pytest.mark.parametrize("header", [b"GGUF", b"GGUF\x03\x00\x00\x00", b"GGUF\x03\x00\x00\x00" + b"\xff" * 64])
def test_a_corrupt_gguf_source_is_refused_in_one_line(tmp_path: Path, header: bytes) -> None:
    source = tmp_path / "model.gguf"
    source.write_bytes(header)  # the magic, then a truncated or garbled header: the reader raised IndexError
    path = tmp_path / "scenario.json"
    doc = json.loads(_placement())
    doc["model"]["source"] = str(source)
    path.write_text(json.dumps(doc))
    refused(("place", "--scenario", str(path)), "cannot read GGUF header")


def test_place_refuses_a_replica_count_past_the_limit() -> None:
    refused(("place", "--scenario", str(PLACE_SCENARIO), "--replicas", "1000000000"), "--replicas")


def test_a_profile_with_a_yaml_error_is_refused_in_one_line(tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text("name: [" + "[" * 2000 + "\n")
    refused(("place", "--scenario", str(PLACE_SCENARIO), "--profile", str(profile)), "profile is not valid YAML")


@pytest.mark.usefixtures("no_stack")
def test_a_file_name_with_control_characters_is_shown_escaped_on_one_line(tmp_path: Path) -> None:
    spec = tmp_path / "odd\nname\x1b[2J.yaml"
    spec.write_text("name: ../x\n")
    refused(("deploy", str(spec)), "odd\\nname\\x1b[2J.yaml")


@pytest.mark.usefixtures("no_stack")
def test_deploy_refuses_one_model_named_in_two_files(tmp_path: Path) -> None:
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("name: m\nvram_claim: 1000\n")
    second.write_text("name: m\nvram_claim: 2000\nreplicas: 3\n")
    refused(("deploy", str(first), str(second)), f"model m is in both {first} and {second}")
