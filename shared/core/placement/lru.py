"""Bounded stores of state kept on a snapshot between decisions, evicting the entry used longest ago.

A store emptied whole when full drops every entry the moment one more shape comes into use: each model in steady
use then falls back to its full path at once (a cliff, at the ninth of eight). Evicting only the least recently
used entry keeps the models decided often, however many others pass through.

A store is an ``OrderedDict`` under its name in ``ClusterSnapshot.memo`` (so it goes whenever the memo is dropped),
its least recently used entry first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any


def used(memo: dict[str, Any], name: str, key: object) -> Any:
    """The entry for ``key`` in the store ``name``, now its most recently used; None if there is none."""
    entries: OrderedDict[object, Any] | None = memo.get(name)
    if entries is None:
        return None
    value = entries.get(key)
    if value is not None:
        entries.move_to_end(key)
    return value


def first(memo: dict[str, Any], name: str, matches: Callable[[Any], bool]) -> Any:
    """The most recently used entry of the store ``name`` that ``matches``, now its most recently used; None if
    none does. For entries found by value rather than by a hashable key (binpack's row scores, matched by their
    claims array)."""
    entries: OrderedDict[object, Any] | None = memo.get(name)
    if entries is None:
        return None
    for key in reversed(entries):  # most recently used first: a claim in steady use is found at once
        value = entries[key]
        if matches(value):
            entries.move_to_end(key)
            return value
    return None


def keep(memo: dict[str, Any], name: str, key: object, value: Any, bound: int) -> None:
    """Store ``value`` as the most recently used entry of the store ``name`` (made on first use), evicting the least
    recently used beyond ``bound``."""
    entries: OrderedDict[object, Any] | None = memo.get(name)
    if entries is None:
        entries = memo[name] = OrderedDict()
    entries[key] = value
    entries.move_to_end(key)  # a replaced entry keeps its old place otherwise
    while len(entries) > bound:
        entries.popitem(last=False)
