"""The bounded stores of kept state evict only the entry used longest ago."""

from __future__ import annotations

from collections import OrderedDict

from shared.core.placement import lru


def test_a_full_store_evicts_only_the_least_recently_used_entry() -> None:
    entries: OrderedDict[str, int] = OrderedDict()
    for i, key in enumerate("abc"):
        lru.keep(entries, key, i, bound=3)
    assert lru.used(entries, "a") == 0  # "a" is now the most recently used: "b" the least
    lru.keep(entries, "d", 3, bound=3)
    assert list(entries) == ["c", "a", "d"]
    assert lru.used(entries, "b") is None


def test_replacing_an_entry_makes_it_the_most_recently_used() -> None:
    entries: OrderedDict[str, int] = OrderedDict()
    for i, key in enumerate("abc"):
        lru.keep(entries, key, i, bound=3)
    lru.keep(entries, "a", 10, bound=3)  # rebuilt (its layout moved): used just now
    lru.keep(entries, "d", 3, bound=3)
    assert dict(entries) == {"c": 2, "a": 10, "d": 3}


def test_the_store_is_made_once_on_the_snapshot_memo() -> None:
    memo: dict[str, object] = {}
    made = lru.store(memo, "x")
    assert lru.store(memo, "x") is made and memo == {"x": made}
