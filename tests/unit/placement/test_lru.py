"""The bounded stores of kept state evict only the entry used longest ago."""

from __future__ import annotations

from typing import Any

from shared.core.placement import lru


def filled(keys: str) -> dict[str, Any]:
    memo: dict[str, Any] = {}
    for i, key in enumerate(keys):
        lru.keep(memo, "s", key, i, bound=len(keys))
    return memo


def test_a_full_store_evicts_only_the_least_recently_used_entry() -> None:
    memo = filled("abc")
    assert lru.used(memo, "s", "a") == 0  # "a" is now the most recently used: "b" the least
    lru.keep(memo, "s", "d", 3, bound=3)
    assert list(memo["s"]) == ["c", "a", "d"]
    assert lru.used(memo, "s", "b") is None


def test_replacing_an_entry_makes_it_the_most_recently_used() -> None:
    memo = filled("abc")
    lru.keep(memo, "s", "a", 10, bound=3)  # rebuilt (say its layout moved): used just now
    lru.keep(memo, "s", "d", 3, bound=3)
    assert dict(memo["s"]) == {"c": 2, "a": 10, "d": 3}


def test_stores_of_other_names_are_apart_and_nothing_is_found_before_a_store_is_made() -> None:
    memo = filled("ab")
    assert lru.used(memo, "t", "a") is None and "t" not in memo
    lru.keep(memo, "t", "a", 5, bound=1)
    assert lru.used(memo, "s", "a") == 0 and lru.used(memo, "t", "a") == 5


def test_an_entry_found_by_value_is_the_most_recently_used_match_and_becomes_the_most_recently_used() -> None:
    memo = filled("abc")  # values 0, 1, 2
    assert lru.first(memo, "s", lambda v: v < 2) == 1  # "b" is more recent than "a"
    lru.keep(memo, "s", "d", 3, bound=3)  # evicts "a", the least recently used, not the "b" just found
    assert list(memo["s"]) == ["c", "b", "d"]
    assert lru.first(memo, "s", lambda v: v > 5) is None and lru.first(memo, "t", lambda v: True) is None
