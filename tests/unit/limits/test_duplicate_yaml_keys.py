"""A key written twice in one YAML mapping, at any depth, is refused with the key and its line, in every YAML
Gantry reads (model specs, placement profiles, router configs); YAML that repeats nothing loads as before."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import msgspec
import pytest

from ops.cli.main import main
from shared.core import strict_yaml
from shared.core.placement.registry import profile_from_yaml
from shared.core.routing import decode_config

DUPLICATES = [  # (text, key as shown, line of the second occurrence, line of the first)
    ("name: m\nname: n\n", "'name'", 2, 1),
    ("name: m\nresources:\n  gpus: 1\n  gpus: 2\n", "'gpus'", 4, 3),
    ("a:\n  - b:\n      c: 1\n      c: 1\n", "'c'", 4, 3),
    ("- {x: 1, y: 2, x: 3}\n", "'x'", 1, 1),
    ("1: a\n1.0: b\n", "1.0", 2, 1),
    ("base: &b {x: 1}\nm:\n  <<: *b\n  y: 1\n  y: 2\n", "'y'", 5, 4),
]


@pytest.mark.parametrize(("text", "key", "line", "first"), DUPLICATES)
def test_a_repeated_key_is_a_decode_error_naming_the_key_and_its_lines(
    text: str, key: str, line: int, first: int
) -> None:
    with pytest.raises(msgspec.DecodeError) as err:
        strict_yaml.decode(text)
    assert f"found duplicate key {key} (first on line {first})" in str(err.value)
    assert f"line {line}, column" in str(err.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: m\nreplicas: 2\n", {"name": "m", "replicas": 2}),
        ("a: {x: 1}\nb: {x: 2}\n", {"a": {"x": 1}, "b": {"x": 2}}),  # the same key in two mappings
        ("base: &b {x: 1, y: 1}\nm:\n  <<: *b\n  x: 2\n", {"base": {"x": 1, "y": 1}, "m": {"x": 2, "y": 1}}),
        ("- {x: 1}\n- {x: 1}\n", [{"x": 1}, {"x": 1}]),
    ],
    ids=["flat", "same-key-elsewhere", "merge-key-overridden", "list-of-mappings"],
)
def test_yaml_without_a_repeated_key_loads_as_before(text: str, expected: object) -> None:
    assert strict_yaml.decode(text) == expected == msgspec.yaml.decode(text)


@pytest.mark.parametrize("text", ["!!python/object/apply:os.system ['true']\n", "x: !!python/name:os.system\n"])
def test_loading_stays_safe_python_tags_are_refused(text: str) -> None:
    with pytest.raises(msgspec.DecodeError, match="could not determine a constructor"):
        strict_yaml.decode(text)


def test_a_long_key_is_cut_in_the_message() -> None:
    key = "k" * 500
    with pytest.raises(msgspec.DecodeError) as err:
        strict_yaml.decode(f"{key}: 1\n{key}: 2\n")
    assert len(str(err.value).splitlines()[0]) < 120


def test_deploy_refuses_a_spec_with_a_repeated_key_in_one_line_with_exit_2(tmp_path: Path) -> None:
    spec = tmp_path / "m.yaml"
    spec.write_text("name: m\nreplicas: 1\nname: n\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
            pytest.raises(SystemExit) as exit_:
        main(["deploy", str(spec)])
    assert exit_.value.code == 2
    assert err.getvalue().count("\n") == 1, err.getvalue()
    assert f"{spec}:3:1: not valid YAML: found duplicate key 'name' (first on line 1)" in err.getvalue()


def test_a_placement_profile_with_a_repeated_key_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="profile is not valid YAML: found duplicate key 'name'") as err:
        profile_from_yaml("name: a\nfilters: []\nname: b\n")
    assert "\n" not in str(err.value) and "line 3" in str(err.value)


def test_a_router_config_with_a_repeated_key_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="router config is not valid YAML: found duplicate key 'type'") as err:
        decode_config("plugins: [{type: queue-scorer, type: random-picker}]\n")
    assert "\n" not in str(err.value) and "line 1" in str(err.value)
