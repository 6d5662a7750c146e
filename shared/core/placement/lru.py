"""Bounded stores of state kept on a snapshot between decisions, evicting the entry used longest ago.

A store emptied whole when full drops every entry the moment one more shape comes into use: each model in steady
use then falls back to its full path at once (a cliff, at the ninth of eight). Evicting only the least recently
used entry keeps the models decided often, however many others pass through.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, TypeVar

K = TypeVar("K")
V = TypeVar("V")


def store(memo: dict[str, Any], name: str) -> OrderedDict[Any, Any]:
    """The store ``name`` in ``memo`` (``ClusterSnapshot.memo``), made empty on first use."""
    found: OrderedDict[Any, Any] | None = memo.get(name)
    if found is None:
        found = memo[name] = OrderedDict()
    return found


def used(entries: OrderedDict[K, V], key: K) -> V | None:
    """The entry for ``key``, now the most recently used; None if there is none."""
    value = entries.get(key)
    if value is not None:
        entries.move_to_end(key)
    return value


def keep(entries: OrderedDict[K, V], key: K, value: V, bound: int) -> V:
    """Store ``value`` as the most recently used entry, evicting the least recently used beyond ``bound``."""
    entries[key] = value
    entries.move_to_end(key)  # a replaced entry keeps its old place otherwise
    while len(entries) > bound:
        entries.popitem(last=False)
    return value
