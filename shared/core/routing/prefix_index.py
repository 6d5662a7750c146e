"""A bounded index from chained block hashes to the endpoints believed to hold them.

One structure serves both prefix indexes:

- *approximate* (GIE proposal 0602 / llm-d ``approx-prefix-cache-producer``): the router inserts the
  request's block hashes for the endpoint it chose (the decision is the assumed cache state);
- *precise* (llm-d ``precise-prefix-cache-producer``): blocks enter and leave as the engines' KV events
  (``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``) report.

Endpoints are bits of an int mask per hash, so matching the longest prefix over every candidate is one
dict lookup and one AND per block. Each endpoint keeps an LRU of its hashes bounded by ``capacity``
(llm-d's ``lruCapacityPerServer`` default 31,250 blocks: (80 − 16) GB / 128 KB per token ÷ 16), so the
index holds at most ``capacity × endpoints`` entries whatever the traffic; a lost remove event can only
cost one LRU slot.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

DEFAULT_CAPACITY = 31_250


class PrefixIndex:
    """hash → bitmask of endpoint slots, with one bounded LRU of hashes per slot."""

    __slots__ = ("_lru", "capacity", "masks")

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"prefix index capacity must be >= 1 block per endpoint, got {capacity}")
        self.capacity = capacity
        self.masks: dict[int, int] = {}
        self._lru: dict[int, OrderedDict[int, None]] = {}

    def __len__(self) -> int:
        """Distinct hashes held by at least one endpoint."""
        return len(self.masks)

    def entries(self) -> int:
        """(hash, endpoint) pairs held: the memory the index uses, in entries."""
        return sum(len(lru) for lru in self._lru.values())

    def blocks_of(self, slot: int) -> int:
        """Hashes held for one endpoint slot."""
        lru = self._lru.get(slot)
        return len(lru) if lru is not None else 0

    def add(self, slot: int, hashes: Iterable[int], capacity: int | None = None) -> None:
        """Mark ``slot`` as holding ``hashes`` (most recent last); evicts its least recently used past the cap."""
        lru = self._lru.get(slot)
        if lru is None:
            lru = self._lru[slot] = OrderedDict()
        masks = self.masks
        bit = 1 << slot
        move = lru.move_to_end
        for h in hashes:
            if h in lru:
                move(h)
            else:
                lru[h] = None
                masks[h] = masks.get(h, 0) | bit
        cap = self.capacity if capacity is None else min(capacity, self.capacity)
        if len(lru) > cap:
            self._evict(slot, lru, len(lru) - cap)

    def _evict(self, slot: int, lru: OrderedDict[int, None], n: int) -> None:
        masks = self.masks
        clear = ~(1 << slot)
        pop = lru.popitem
        for _ in range(n):
            h, _ = pop(last=False)
            m = masks.get(h, 0) & clear
            if m:
                masks[h] = m
            else:
                masks.pop(h, None)

    def remove(self, slot: int, hashes: Iterable[int]) -> None:
        """``slot`` no longer holds ``hashes`` (unknown ones are ignored)."""
        lru = self._lru.get(slot)
        if lru is None:
            return
        masks = self.masks
        clear = ~(1 << slot)
        for h in hashes:
            if lru.pop(h, 0) is None:
                m = masks.get(h, 0) & clear
                if m:
                    masks[h] = m
                else:
                    masks.pop(h, None)

    def clear(self, slot: int) -> None:
        """Forget everything ``slot`` held (engine reset, or the endpoint left the pool)."""
        lru = self._lru.pop(slot, None)
        if lru is None:
            return
        masks = self.masks
        clear = ~(1 << slot)
        for h in lru:
            m = masks.get(h, 0) & clear
            if m:
                masks[h] = m
            else:
                masks.pop(h, None)

    def match(self, hashes: Sequence[int], candidates: int) -> dict[int, int]:
        """Leading blocks of ``hashes`` each candidate slot holds without a gap: slot → matched blocks.

        Walks from the first block and stops when no candidate still matches; only slots with at least
        one block appear. (An engine's prefix cache only serves a chain from its start, so a block held
        after a missing one is useless.)
        """
        out: dict[int, int] = {}
        alive = self.walk(hashes, 0, len(hashes), candidates, out)
        if alive and hashes:
            spread(out, alive, len(hashes))
        return out

    def walk(self, hashes: Sequence[int], start: int, end: int, alive: int, out: dict[int, int]) -> int:
        """Continue a match over ``hashes[start:end]``: slots that stop matching at block i get ``out[slot] = i``;
        returns the slots still matching every block up to ``end``."""
        masks = self.masks
        get = masks.get
        for i in range(start, end):
            nxt = alive & get(hashes[i], 0)
            if nxt != alive:
                if i:
                    spread(out, alive & ~nxt, i)
                alive = nxt
                if not alive:
                    return 0
        return alive


def spread(out: dict[int, int], mask: int, value: int) -> None:
    """out[slot] = value for every set bit of ``mask``."""
    while mask:
        low = mask & -mask
        out[low.bit_length() - 1] = value
        mask ^= low
