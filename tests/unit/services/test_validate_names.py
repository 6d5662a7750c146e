"""Names: models may be dotted like real model names; worker names must also be NATS subject tokens."""

from __future__ import annotations

import pytest

from shared.bus.validate import bad_model_name, bad_worker_name


@pytest.mark.parametrize("name", ["llama-3.1-8b", "qwen2.5-7b-instruct", "Mixtral_8x7B", "m"])
def test_model_names_may_hold_dots(name: str) -> None:
    assert bad_model_name(name) is None


@pytest.mark.parametrize(
    ("name", "reason"),
    [("", "empty model name"), ("a:b", "invalid model name 'a:b'"), ("a|b", "invalid model name"),
     ("a;b", "invalid model name"), ("a b", "invalid model name"), ("x" * 64, "longer than 63"),
     ("../../etc/passwd", "invalid model name"), ("-m", "invalid model name"), ('m"', "invalid model name"),
     ("m*", "invalid model name"), ("m>", "invalid model name")],
)
def test_model_names_refuse_id_separators_wildcards_spaces_and_excess_length(name: str, reason: str) -> None:
    assert reason in (bad_model_name(name) or "")


@pytest.mark.parametrize("name", ["gpu-node-1.dc1", "w*", "w>", "w:1", "w|x", ""])
def test_worker_names_refuse_what_would_break_a_subject_token(name: str) -> None:
    assert bad_worker_name(name) is not None


@pytest.mark.parametrize("name", ["w0", "gpu-node-17", "rack3_host2"])
def test_plain_worker_names_pass(name: str) -> None:
    assert bad_worker_name(name) is None
