"""Sync requests to unknown workers: once per worker and period, and no memory kept of workers long gone."""

from __future__ import annotations

from shared.host.throttle import PRUNE_FROM, PerKeyThrottle


def test_a_key_is_let_through_once_per_period() -> None:
    gate = PerKeyThrottle(2.0)
    assert [gate.allow("w1", t) for t in (0.0, 1.9, 2.0, 2.5)] == [True, False, True, False]


def test_keys_are_throttled_each_on_its_own() -> None:
    gate = PerKeyThrottle(2.0)
    assert gate.allow("w1", 0.0) and gate.allow("w2", 0.5) and not gate.allow("w1", 1.0)


def test_an_endless_stream_of_new_keys_keeps_only_those_of_one_period() -> None:
    gate = PerKeyThrottle(2.0)
    for n in range(100_000):  # a new worker name every millisecond
        assert gate.allow(f"w{n}", n / 1000)
    assert len(gate) <= 2 * max(PRUNE_FROM, 2000)


def test_a_prune_drops_the_expired_keys_and_keeps_throttling_the_others() -> None:
    gate = PerKeyThrottle(2.0)
    for n in range(PRUNE_FROM - 1):
        gate.allow(f"old{n}", 0.0)
    gate.allow("recent", 10.0)
    gate.allow("new", 10.5)  # the key past PRUNE_FROM: the expired ones go
    assert len(gate) == 2
    assert not gate.allow("recent", 11.0)
    assert gate.allow("old0", 11.0)
