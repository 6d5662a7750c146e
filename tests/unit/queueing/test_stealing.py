"""Global mode's pure decisions: shard hash, victim choice, steal size."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from shared.core.queueing import choose_victim, crc16_ccitt_false, load_shard, steal_size


def test_crc16_ccitt_false_check_value() -> None:
    assert crc16_ccitt_false(b"123456789") == 0x29B1  # the catalogued check value of CRC-16/CCITT-FALSE


def test_one_shard_holds_everyone_and_shards_spread_names() -> None:
    assert {load_shard(f"n{i}", 1) for i in range(50)} == {0}
    assert len({load_shard(f"n{i}", 4) for i in range(50)}) == 4
    with pytest.raises(ValueError):
        load_shard("n", 0)


@pytest.mark.parametrize(("batch", "size"), [(0, 1), (1, 1), (2, 1), (3, 2), (8, 4)])
def test_steal_size_is_half_the_batch_rounded_up(batch: int, size: int) -> None:
    assert steal_size(batch) == size


def test_only_peers_at_or_above_the_min_load_score_are_stolen_from_never_oneself() -> None:
    peers = [("me", 100.0), ("low", 2.0), ("ok", 3.0), ("high", 9.0)]
    picks = Counter(choose_victim(peers, "me", 3.0, random.Random(s)) for s in range(200))
    assert set(picks) == {"ok", "high"}


def test_no_victim_when_nobody_is_loaded_enough() -> None:
    assert choose_victim([("me", 50.0), ("a", 1.0)], "me", 3.0, random.Random(0)) is None
    assert choose_victim([], "me", 1.0, random.Random(0)) is None


def test_the_choice_is_deterministic_for_a_seeded_rng() -> None:
    peers = [(f"n{i}", float(i)) for i in range(100)]
    assert choose_victim(peers, "x", 1, random.Random(7)) == choose_victim(peers, "x", 1, random.Random(7))


def test_only_the_fifty_least_loaded_candidates_are_considered() -> None:
    peers = [(f"n{i:03d}", float(10 + i)) for i in range(200)]
    picks = {choose_victim(peers, "x", 1, random.Random(s)) for s in range(500)}
    assert picks and all(int(p[1:]) < 50 for p in picks if p)
