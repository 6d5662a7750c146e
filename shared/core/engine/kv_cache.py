"""KV block pool with a prefix cache, following vLLM v1's block pool semantics.

Block 0 is the reserved null block. Free blocks sit in one LRU list (a doubly linked list over block ids,
so a cache hit can take a block out of the middle in O(1)). Freeing a request walks its blocks in
reverse order: with caching on, blocks that never got a hash go to the *front* (they can never be hit,
so they are reused first) and hashed ones to the *back*, so tail blocks are evicted before the prefix
blocks other requests may share (vLLM v0.33 ``BlockPool.free_blocks``); with caching off every block goes
to the back. Allocation pops from the head and only then forgets the popped block's hash (lazy eviction).

Full blocks carry a chained hash ``h_i = h_{i-1} XOR H(i, content of block i)``; for token-id requests it is
exactly :func:`shared.core.kv_events.chain_hashes` from the request's root (its cache salt, or
``ROOT_HASH``), so a router hashing the same tokens finds the engine's keys. The same content computed
twice gives two blocks with one hash: the index keeps both (the oldest answers lookups) and evicting one
removes only that block id. With events on, the cache records what it stored and removed in vLLM's
KV-event schema; with them off the hot path pays one ``is None`` test per newly full block run.
"""

from __future__ import annotations

from shared.core.engine.request import Request
from shared.core.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, block_hash, chain_hashes

UNIQUE_TAG = 0x5EED_0F_B10C  # marks hashes of request-unique content (never collides with -1 == -2)


class KVCache:
    """Block pool + prefix-cache index for one engine (all layers share block ids, as in vLLM)."""

    __slots__ = (
        "_dups",
        "_head",
        "_nxt",
        "_prev",
        "block_hash",
        "block_size",
        "cached",
        "enable_caching",
        "events",
        "num_blocks",
        "num_free",
        "ref_cnt",
    )

    def __init__(
        self, num_blocks: int, block_size: int, enable_caching: bool = True, enable_events: bool = False
    ) -> None:
        if num_blocks < 2:
            raise ValueError("num_blocks must be >= 2 (block 0 is reserved)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        head = num_blocks  # sentinel node closing the circular free list
        self._head = head
        self._nxt = [*range(1, num_blocks), head, 1]
        self._prev = [head, *range(0, num_blocks - 1), num_blocks - 1]
        self._nxt[0] = self._prev[0] = 0  # block 0 never joins the free list
        self._prev[1] = head
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> the oldest cached block holding it (answers lookups)
        self._dups: dict[int, list[int]] = {}  # hash -> younger blocks with the same content, oldest first
        self.num_free = num_blocks - 1
        self.events: list[KVEvent] | None = [] if enable_events else None

    # -- free list ------------------------------------------------------------------------------------
    def _unlink(self, b: int) -> None:
        nxt, prev = self._nxt, self._prev
        p, n = prev[b], nxt[b]
        nxt[p] = n
        prev[n] = p
        self.num_free -= 1

    def _push_tail(self, b: int) -> None:
        nxt, prev, head = self._nxt, self._prev, self._head
        last = prev[head]
        nxt[last] = b
        prev[b] = last
        nxt[b] = head
        prev[head] = b
        self.num_free += 1

    def _push_front(self, blocks: list[int]) -> None:
        """Insert ``blocks`` at the head, in the given order (the first is reused first)."""
        nxt, prev, head = self._nxt, self._prev, self._head
        first = nxt[head]
        p = head
        for b in blocks:
            nxt[p] = b
            prev[b] = p
            p = b
        nxt[p] = first
        prev[first] = p
        self.num_free += len(blocks)

    def _pop_head(self) -> int:
        b: int = self._nxt[self._head]
        self._unlink(b)
        h = self.block_hash[b]
        if h is not None:  # lazy eviction: the block's cached content dies only now
            self._evict(b, h)
        self.ref_cnt[b] = 1
        return b

    def _evict(self, b: int, h: int) -> None:
        """Drop block ``b`` (holding hash ``h``) from the index; other blocks with ``h`` stay findable."""
        cached, dups = self.cached, self._dups
        if cached.get(h) == b:
            younger = dups.get(h)
            if younger:
                cached[h] = younger.pop(0)
                if not younger:
                    del dups[h]
            else:
                del cached[h]
        else:
            younger = dups[h]
            younger.remove(b)
            if not younger:
                del dups[h]
        self.block_hash[b] = None
        if self.events is not None:
            self.events.append(BlockRemoved([h]))

    def free_list(self) -> list[int]:
        """Free block ids from the eviction end (head) to the most recently freed (tail)."""
        out: list[int] = []
        b = self._nxt[self._head]
        while b != self._head:
            out.append(b)
            b = self._nxt[b]
        return out

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free / (self.num_blocks - 1)

    @property
    def num_used(self) -> int:
        """Usable blocks held by requests."""
        return self.num_blocks - 1 - self.num_free

    # -- hashing --------------------------------------------------------------------------------------
    def hash_at(self, req: Request, b: int) -> int:
        """The chained hash of ``req``'s block ``b`` (computed lazily, then kept on the request).

        For token-id requests this is ``chain_hashes(tokens, block_size, parent=req.hash_root)[b]``.
        """
        hashes = req.block_hashes
        bs = self.block_size
        while len(hashes) <= b:
            i = len(hashes)
            parent = hashes[i - 1] if i else req.hash_root
            toks = req.all_token_ids
            if toks is not None:
                if i < b:
                    # every missing block up to b in one C-level pass (the same values block by block)
                    got = chain_hashes(toks[i * bs : (b + 1) * bs], bs, parent, i)
                    if got:
                        hashes.extend(got)
                        continue
                # one block: a decode step filling its block (the common case; a third of chain_hashes' cost
                # for one block, same value), or a partial block (never cached)
                h = block_hash(parent, i, toks[i * bs : (i + 1) * bs])
            elif req.prefix_ids is not None and (i + 1) * bs <= req.prompt_len:
                # trace prefix ids are already chained: (id of the unit, block index) names the content
                h = hash((req.prefix_ids[i * bs // req.prefix_unit], i))
            else:
                h = hash((parent, req.uid, i, UNIQUE_TAG))  # content unique to this request
            hashes.append(h)
        return hashes[b]

    # -- prefix cache ---------------------------------------------------------------------------------
    def lookup(self, req: Request) -> list[int]:
        """Longest chain of cached full blocks for ``req``'s tokens, never covering its last token."""
        hits: list[int] = []
        if not self.enable_caching:
            return hits
        cached = self.cached
        for b in range((req.num_tokens - 1) // self.block_size):
            blk = cached.get(self.hash_at(req, b))
            if blk is None:
                break
            hits.append(blk)
        return hits

    def num_evictable(self, blocks: list[int]) -> int:
        """How many of ``blocks`` sit in the free list (taking them shrinks the free pool)."""
        ref = self.ref_cnt
        return sum(1 for b in blocks if ref[b] == 0)

    def take_hits(self, req: Request, hits: list[int]) -> None:
        """Give ``req`` the cached blocks it hit (out of the free list if unreferenced)."""
        ref = self.ref_cnt
        for b in hits:
            if ref[b] == 0:
                self._unlink(b)
            ref[b] += 1
        req.block_ids.extend(hits)
        req.num_cached_blocks = len(hits)
        req.num_slots = len(req.block_ids) * self.block_size
        req.next_full = (len(hits) + 1) * self.block_size

    def allocate(self, req: Request, n: int) -> None:
        """Append ``n`` fresh blocks to ``req`` (the caller checked ``n <= num_free``)."""
        ids = req.block_ids
        for _ in range(n):
            ids.append(self._pop_head())
        req.num_slots = len(ids) * self.block_size

    def cache_full_blocks(self, req: Request, num_computed: int) -> None:
        """Register ``req``'s blocks that are full once ``num_computed`` tokens are computed."""
        full = num_computed // self.block_size
        start = req.num_cached_blocks
        if full <= start:
            return
        req.next_full = (full + 1) * self.block_size
        cached, bh, ids = self.cached, self.block_hash, req.block_ids
        for b in range(start, full):
            h = self.hash_at(req, b)
            blk = ids[b]
            bh[blk] = h
            if h not in cached:
                cached[h] = blk
            else:  # same content computed twice (e.g. two requests prefilled it in one step): keep both
                self._dups.setdefault(h, []).append(blk)
        req.num_cached_blocks = full
        if self.events is not None:
            self._stored(req, start, full)

    def _stored(self, req: Request, start: int, full: int) -> None:
        bs = self.block_size
        toks = req.all_token_ids
        assert self.events is not None
        self.events.append(
            BlockStored(
                block_hashes=req.block_hashes[start:full],
                parent_block_hash=req.block_hashes[start - 1] if start else None,
                token_ids=toks[start * bs : full * bs] if toks is not None else [],
                block_size=bs,
                lora_id=req.lora_id,
            )
        )

    def take_events(self) -> list[KVEvent]:
        """Events recorded since the last call (empty when events are off)."""
        ev = self.events
        if not ev:
            return []
        self.events = []
        return ev

    def reset(self) -> bool:
        """Forget every cached hash; only possible when no request holds a block (as vLLM's reset)."""
        if self.num_free != self.num_blocks - 1:
            return False
        bh = self.block_hash
        for b in range(self.num_blocks):
            bh[b] = None
        self.cached.clear()
        self._dups.clear()
        if self.events is not None:
            self.events.append(AllBlocksCleared())
        return True

    def free(self, req: Request) -> None:
        """Release ``req``'s blocks, tail first: unhashed ones to the head, hashed ones to the tail."""
        ref = self.ref_cnt
        if self.enable_caching:
            bh = self.block_hash
            front: list[int] = []
            for b in reversed(req.block_ids):
                ref[b] -= 1
                if ref[b] == 0:
                    if bh[b] is None:
                        front.append(b)
                    else:
                        self._push_tail(b)
            if front:
                self._push_front(front)
        else:  # nothing can be hit: every block goes to the tail (vLLM keeps LRU reuse for locality)
            for b in reversed(req.block_ids):
                ref[b] -= 1
                if ref[b] == 0:
                    self._push_tail(b)
        req.block_ids = []
        req.num_cached_blocks = 0
        req.num_slots = 0
        req.next_full = self.block_size

    def check_consistency(self) -> list[str]:
        """Invariant violations (for tests): free list vs ref counts vs the hash index."""
        errs: list[str] = []
        free = self.free_list()
        if len(free) != self.num_free:
            errs.append(f"free list length {len(free)} != num_free {self.num_free}")
        if len(set(free)) != len(free):
            errs.append("free list has duplicates")
        if 0 in free:
            errs.append("null block in free list")
        for b in free:
            if self.ref_cnt[b] != 0:
                errs.append(f"free block {b} has ref {self.ref_cnt[b]}")
        in_use = {b for b in range(1, self.num_blocks) if self.ref_cnt[b] > 0}
        if len(in_use) + len(free) != self.num_blocks - 1:
            errs.append("blocks neither free nor referenced")
        indexed = [(h, b) for h, b in self.cached.items()]
        indexed += [(h, b) for h, bs in self._dups.items() for b in bs]
        for h, b in indexed:
            if self.block_hash[b] != h:
                errs.append(f"cache index maps {h} to block {b} holding {self.block_hash[b]}")
        if len({b for _, b in indexed}) != len(indexed):
            errs.append("a block is indexed twice")
        hashed = sum(1 for b in range(self.num_blocks) if self.block_hash[b] is not None)
        if hashed != len(indexed):
            errs.append(f"{hashed} blocks hold a hash but the index has {len(indexed)}")
        return errs
