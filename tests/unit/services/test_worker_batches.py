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
