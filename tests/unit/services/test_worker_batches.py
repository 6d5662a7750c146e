"""Assignments and status reports travel several to a message, and a lone one is still read."""

from __future__ import annotations

import pytest

from services.workers.emulator import _assignments
from shared.bus.messages import (
    AssignInstance,
    AssignInstances,
    InstanceReports,
    InstanceStatus,
    MessageError,
    decode,
    encode,
)
from shared.core.placement.domain import InstanceState

ONE = AssignInstance(instance_id="m-1", model="m", source="org/m", gpu_indexes=(0,), vram_claims=(1,))
TWO = AssignInstance(instance_id="m-2", model="m", source="org/m", gpu_indexes=(1,), vram_claims=(1,))


def test_an_assignment_of_several_names_each_instance_in_order() -> None:
    assert _assignments(encode(AssignInstances(instances=(ONE, TWO)))) == (ONE, TWO)


def test_a_lone_assignment_is_an_assignment_of_one() -> None:
    assert _assignments(encode(ONE)) == (ONE,)


@pytest.mark.parametrize("body", [b"", b"{}", b'{"instances": []}', b'{"instances": [{"model": "m"}]}', b"[1]",
                                  b'{"instance_id": 7}'])
def test_a_malformed_assignment_is_refused_as_a_message_error(body: bytes) -> None:
    with pytest.raises(MessageError):
        _assignments(body)


def test_a_report_batch_holds_at_least_one_report() -> None:
    with pytest.raises(MessageError):
        decode(b'{"reports": []}', InstanceReports)
    one = InstanceStatus(instance_id="m-1", worker="w1", state=InstanceState.STARTING)
    assert decode(encode(InstanceReports(reports=(one,))), InstanceReports).reports == (one,)


async def test_a_report_is_retried_until_stored_however_long_the_stream_is_away(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # dropped after 20 attempts (~33 s), a lost STARTING or RUNNING left its replica SCHEDULED for good
    import asyncio

    import nats.js.errors

    import services.workers.emulator as emulator

    sent: list[str] = []

    async def js_publish(nc: object, subject: str, payload: bytes, msg_id: str, timeout: float) -> None:
        sent.append(msg_id)
        if len(sent) <= 100:  # minutes of an outage at the longest pause
            raise nats.js.errors.ServiceUnavailableError

    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(s: float) -> None:
        slept.append(s)
        await real_sleep(0)

    monkeypatch.setattr(emulator, "js_publish", js_publish)
    monkeypatch.setattr(emulator.asyncio, "sleep", sleep)
    fleet = emulator.Fleet(emulator.FleetConfig(count=1, gpus=1), nc=None)  # type: ignore[arg-type]
    w = next(iter(fleet.workers.values()))
    await fleet._report(w, [InstanceStatus(instance_id="m-1", worker=w.worker.name, state=InstanceState.STARTING)])
    assert len(sent) == 101 and len(set(sent)) == 1  # one message id throughout: the stream dedupes a re-send
    assert max(slept) == emulator.REPORT_RETRY_MAX_S
