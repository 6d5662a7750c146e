"""The state writer's verdict on a heartbeat: stored, dead-lettered, and whether its worker is asked to register."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.reconciler.writer import judge_heartbeat, unlike_stored
from shared.bus.messages import Heartbeat
from shared.bus.validate import bad_worker_name, check_heartbeat
from shared.core.placement.domain import GIB, Gpu, GpuUsage, Worker

TWO = Worker(name="w1", gpus=(Gpu(index=0, vram_total=80 * GIB), Gpu(index=1, vram_total=80 * GIB)),
             ram_total=256 * GIB)
ONE = Worker(name="w1", gpus=(Gpu(index=0, vram_total=80 * GIB),), ram_total=256 * GIB)


def beat(*indexes: int, used: int = 0) -> Heartbeat:
    return Heartbeat(worker="w1", gpus=tuple(GpuUsage(index=i, vram_used=used) for i in indexes))


@pytest.mark.parametrize(
    ("hb", "stored", "pending", "refused", "ask"),
    [
        (beat(0, 1), TWO, None, False, False),  # the usual heartbeat: stored, nobody asked
        (beat(0, 1), None, None, True, True),  # unknown worker: refused, asked to register
        (beat(0, 1), ONE, None, True, True),  # a GPU the stored inventory lacks: refused, asked
        (beat(0, 1), ONE, TWO, False, True),  # the registration not stored yet knows it: kept, still asked
        (beat(0, 1), None, TWO, False, True),  # first heartbeat right after a registration: kept, asked
        (beat(0, used=-1), TWO, None, True, False),  # negative usage: refused, the inventory is not the problem
        (beat(0, 0), TWO, None, True, False),  # one GPU twice: refused, the inventory is not the problem
        (beat(0, 0), ONE, TWO, True, False),  # ... whichever inventory it is checked with
    ],
)
def test_heartbeat_verdict_and_whether_its_worker_is_asked_to_register(
    hb: Heartbeat, stored: Worker | None, pending: Worker | None, refused: bool, ask: bool
) -> None:
    reason, asked = judge_heartbeat(hb, stored, pending)
    assert (reason is not None) == refused
    assert asked == ask


@given(
    beat_gpus=st.lists(st.integers(0, 3), max_size=4, unique=True),
    stored_gpus=st.none() | st.lists(st.integers(0, 3), max_size=4, unique=True),
    pending_gpus=st.none() | st.lists(st.integers(0, 3), max_size=4, unique=True),
    negative=st.booleans(),
)
def test_the_ask_matches_comparing_every_heartbeat_with_the_stored_inventory(
    beat_gpus: list[int], stored_gpus: list[int] | None, pending_gpus: list[int] | None, negative: bool
) -> None:
    def worker(indexes: list[int] | None) -> Worker | None:
        if indexes is None:
            return None
        return Worker(name="w1", gpus=tuple(Gpu(index=i, vram_total=80 * GIB) for i in indexes), ram_total=GIB)

    hb = beat(*beat_gpus, used=-1 if negative else 0)
    stored, pending = worker(stored_gpus), worker(pending_gpus)
    reason, asked = judge_heartbeat(hb, stored, pending)
    # The rule before the shortcut: every heartbeat compared with the stored inventory.
    expected = check_heartbeat(hb, stored)
    if expected and pending is not None and check_heartbeat(hb, pending) is None:
        expected = None
    assert reason == expected
    assert asked == (unlike_stored(hb, stored) and not bad_worker_name(hb.worker))


def test_a_heartbeat_naming_a_gpu_twice_is_refused_with_the_indexes() -> None:
    assert check_heartbeat(beat(1, 0, 1), TWO) == "heartbeat from w1: duplicate GPU indexes [1, 0, 1]"
