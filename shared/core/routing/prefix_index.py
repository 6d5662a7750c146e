"""A bounded index from chained block hashes to the endpoints believed to hold them.

One structure serves both prefix indexes:

- *approximate* (GIE proposal 0602 / llm-d ``approx-prefix-cache-producer``): the router inserts the
  request's block hashes for the endpoint it chose (the decision is the assumed cache state);
- *precise* (llm-d ``precise-prefix-cache-producer``): blocks enter and leave as the engines' KV events
  (``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``) report.

Endpoints are bits of an int mask per hash, so matching the longest prefix over every candidate is one
dict lookup and one AND per block. Each endpoint holds at most ``capacity`` hashes, least recently used
evicted first (llm-d's ``lruCapacityPerServer`` default 31,250 blocks: (80 − 16) GB / 128 KB per token
÷ 16), so the index holds at most ``capacity × endpoints`` entries whatever the traffic; a lost remove
event can only cost one slot.

Recency is kept by generation rather than by moving each block in a linked list: touching a request's
250 blocks is one C-level ``dict.update`` (hash → generation) plus one append to a touch log; eviction
walks the log oldest first and drops a hash only if its generation there is still its latest. The log is
compacted when it grows past four times the live entries, so it is bounded too.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from operator import itemgetter

DEFAULT_CAPACITY = 31_250
LOG_SLACK = 4  # the touch log may hold this many times the live entries (plus a constant) before compaction


class PrefixIndex:
    """hash → bitmask of endpoint slots, with a bounded, generation-ordered set of hashes per slot."""

    __slots__ = ("_gen", "_held", "_log", "_logged", "capacity", "masks", "partner", "union")

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"prefix index capacity must be >= 1 block per endpoint, got {capacity}")
        self.capacity = capacity
        self.masks: dict[int, int] = {}
        self._held: dict[int, dict[int, int]] = {}  # slot → hash → generation of its last touch
        self._log: dict[int, deque[tuple[int, Sequence[int]]]] = {}  # slot → (generation, hashes), oldest first
        self._logged: dict[int, int] = {}
        self._gen = 0
        # optional: a dict shared with a partner index holding, per hash, the OR of both indexes' masks, so
        # a match over "either index" is one lookup per block instead of two (see ``mirror``)
        self.union: dict[int, int] | None = None
        self.partner: PrefixIndex | None = None

    def mirror(self, partner: PrefixIndex) -> dict[int, int]:
        """Keep, from now on, ``hash → self's mask | partner's mask`` in one dict both update; returns it."""
        union: dict[int, int] = {}
        for idx in (self, partner):
            for h, m in idx.masks.items():
                union[h] = union.get(h, 0) | m
        self.union = partner.union = union
        self.partner, partner.partner = partner, self
        return union

    def _unset(self, h: int) -> None:
        """Refresh the union entry of ``h`` after a bit of it was cleared here."""
        union, partner = self.union, self.partner
        if union is not None and partner is not None:
            m = self.masks.get(h, 0) | partner.masks.get(h, 0)
            if m:
                union[h] = m
            else:
                union.pop(h, None)

    def __len__(self) -> int:
        """Distinct hashes held by at least one endpoint."""
        return len(self.masks)

    def entries(self) -> int:
        """(hash, endpoint) pairs held: the memory the index uses, in entries."""
        return sum(len(h) for h in self._held.values())

    def log_entries(self) -> int:
        """Hashes in the touch logs (bounded by compaction)."""
        return sum(self._logged.values())

    def blocks_of(self, slot: int) -> int:
        """Hashes held for one endpoint slot."""
        held = self._held.get(slot)
        return len(held) if held is not None else 0

    def holds(self, slot: int, h: int) -> bool:
        """True when ``slot`` holds ``h``."""
        held = self._held.get(slot)
        return held is not None and h in held

    def add(self, slot: int, hashes: Sequence[int], capacity: int | None = None) -> None:
        """``slot`` holds ``hashes`` now (touched as most recent); evicts its least recent past the cap."""
        if not hashes:
            return
        held = self._held.get(slot)
        if held is None:
            held = self._held[slot] = {}
            self._log[slot] = deque()
            self._logged[slot] = 0
        new = [h for h in hashes if h not in held]
        self._gen += 1
        held.update(dict.fromkeys(hashes, self._gen))
        self._log[slot].append((self._gen, hashes))
        self._logged[slot] += len(hashes)
        if new:
            masks = self.masks
            get = masks.get
            bit = 1 << slot
            for h in new:
                masks[h] = get(h, 0) | bit
            union = self.union
            if union is not None:
                uget = union.get
                for h in new:
                    union[h] = uget(h, 0) | bit
        cap = self.capacity if capacity is None else min(capacity, self.capacity)
        if len(held) > cap:
            self._evict(slot, held, cap)
        if self._logged[slot] > LOG_SLACK * len(held) + 1024:
            self._compact(slot, held)

    def _drop_bit(self, h: int, clear: int) -> None:
        masks = self.masks
        m = masks.get(h, 0) & clear
        if m:
            masks[h] = m
        else:
            masks.pop(h, None)
        if self.union is not None:
            self._unset(h)

    def _evict(self, slot: int, held: dict[int, int], cap: int) -> None:
        log = self._log[slot]
        clear = ~(1 << slot)
        drop = self._drop_bit
        while len(held) > cap and log:
            gen, hashes = log.popleft()
            self._logged[slot] -= len(hashes)
            for i, h in enumerate(hashes):
                if held.get(h) == gen:
                    del held[h]
                    drop(h, clear)
                    if len(held) <= cap:
                        rest = hashes[i + 1 :]
                        if rest:
                            log.appendleft((gen, rest))
                            self._logged[slot] += len(rest)
                        return

    def _compact(self, slot: int, held: dict[int, int]) -> None:
        log: deque[tuple[int, Sequence[int]]] = deque()
        gen = -1
        batch: list[int] = []
        for h, g in sorted(held.items(), key=itemgetter(1)):
            if g != gen and batch:
                log.append((gen, batch))
                batch = []
            gen = g
            batch.append(h)
        if batch:
            log.append((gen, batch))
        self._log[slot] = log
        self._logged[slot] = len(held)

    def remove(self, slot: int, hashes: Sequence[int]) -> None:
        """``slot`` no longer holds ``hashes`` (unknown ones are ignored)."""
        held = self._held.get(slot)
        if held is None:
            return
        clear = ~(1 << slot)
        masks = self.masks
        pop = held.pop
        mirrored = self.union is not None
        for h in hashes:
            if pop(h, None) is not None:
                m = masks.get(h, 0) & clear
                if m:
                    masks[h] = m
                else:
                    masks.pop(h, None)
                if mirrored:
                    self._unset(h)

    def clear(self, slot: int) -> None:
        """Forget everything ``slot`` held (engine reset, or the endpoint left the pool)."""
        held = self._held.pop(slot, None)
        self._log.pop(slot, None)
        self._logged.pop(slot, None)
        if held is None:
            return
        clear = ~(1 << slot)
        for h in held:
            self._drop_bit(h, clear)

    def match(self, hashes: Sequence[int], candidates: int) -> dict[int, int]:
        """Leading blocks of ``hashes`` each candidate slot holds without a gap: slot → matched blocks.

        Walks from the first block and stops when no candidate still matches; only slots with at least
        one block appear. (An engine's prefix cache only serves a chain from its start, so a block held
        after a missing one is useless.)
        """
        out: dict[int, int] = {}
        alive = walk(self.masks.get, hashes, 0, len(hashes), candidates, out)
        if alive and hashes:
            spread(out, alive, len(hashes))
        return out


def walk(get: Callable[[int, int], int], hashes: Sequence[int], start: int, end: int, alive: int,
         out: dict[int, int]) -> int:
    """Continue a match over ``hashes[start:end]`` with ``get(hash, 0) → mask``: slots that stop matching at
    block i get ``out[slot] = i``; returns the slots still matching every block up to ``end``."""
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
