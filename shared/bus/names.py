"""One shared copy of each worker-name list that keeps arriving on the bus.

Survivor and candidate lists are cluster-sized (a name per worker) and repeat from message to message, and
the stages key their caches on them (fitting's results, row lookups, located candidate sets). A freshly
decoded list is a new tuple of new strings: every cache lookup would compute a thousand string hashes and
compare a thousand strings. Swapped for the first equal list seen, a lookup reuses the strings' cached
hashes and its equality check stops at identity.
"""

from __future__ import annotations

NAME_LISTS_KEPT = 64


class NameLists:
    """Canonical copies of recently seen name lists."""

    def __init__(self, kept: int = NAME_LISTS_KEPT) -> None:
        self.kept = kept
        self._lists: dict[str, tuple[str, ...]] = {}

    def canonical(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """The first seen list equal to ``names`` (``names`` itself if new)."""
        key = "\n".join(names)  # one string: one hash and one compare, not one per name
        got = self._lists.get(key)
        if got is None:
            if len(self._lists) >= self.kept:
                self._lists.clear()
            got = self._lists[key] = names
        return got

    def all(self, lists: tuple[tuple[str, ...], ...]) -> tuple[tuple[str, ...], ...]:
        """``canonical`` of each list."""
        return tuple(self.canonical(names) for names in lists)
