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


def _registration(*gpus: object) -> object:
    from shared.bus.messages import WorkerRegistration
    from shared.core.placement.domain import GIB, Gpu, Worker

    return WorkerRegistration(worker=Worker(name="w1", gpus=tuple(
        Gpu(index=i, vram_total=80 * GIB, **kw) for i, kw in enumerate(gpus))))  # type: ignore[arg-type]


@pytest.mark.parametrize(("gpus", "reason"), [
    ([{"vendor": f"v{i}"} for i in range(9)], "9 kinds of GPU"),  # every service interns each kind for good
    ([{"product": "H100-" + "x" * 200}], "longer than 128 characters"),
])
def test_an_inventory_of_too_many_or_too_long_gpu_kinds_is_refused(gpus: list[dict[str, str]], reason: str) -> None:
    from shared.bus.validate import check_registration

    assert reason in (check_registration(_registration(*gpus)) or "")  # type: ignore[arg-type]


def test_a_machine_of_a_few_gpu_kinds_registers() -> None:
    from shared.bus.validate import check_registration

    gpus = [{"product": "H100-SXM-80GB"}] * 6 + [{"vendor": "rocm", "product": "MI300X"}] * 2
    assert check_registration(_registration(*gpus)) is None  # type: ignore[arg-type]
