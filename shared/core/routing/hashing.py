"""A request's chained block hashes, computed lazily: only as far as some candidate still matches.

Token prompts use ``shared.core.kv_events.chain_hashes`` (the one hash engines and routers share), so
the precise index finds exactly the keys the engines report in their KV events. Hashing is the dominant
cost of a routing decision in Python (a 4,000-token prompt is 250 blocks of 16), so a match walks the
chain in chunks of 32 blocks and stops hashing where the longest match ends; the full chain is computed
only when the decision is committed to the assumed-state index.

Text prompts (no tokenizer at hand) are cut into ``4 × block_size`` characters, as GIE v1.0's approximate
prefix plugin does (64 characters ≈ 16 tokens); their keys only serve the approximate index.
"""

from __future__ import annotations

from collections.abc import Callable

from shared.core.kv_events import chain_hashes, chain_root, lora_int_id
from shared.core.routing.domain import RouteRequest
from shared.core.routing.prefix_index import PrefixIndex, spread, walk

CHARS_PER_TOKEN = 4
CHUNK = 32  # blocks hashed per round of a match: hashing stops at most this far past the longest match


def text_hashes(text: str, block_chars: int, parent: int) -> list[int]:
    """Chained hashes of full ``block_chars`` blocks of ``text`` (an int of the UTF-8 bytes per block, so
    the value is the same in every process: only str/bytes hashing is salted by PYTHONHASHSEED)."""
    out: list[int] = []
    h = parent
    data = text.encode("utf-8")
    for start in range(0, len(data) - block_chars + 1, block_chars):
        h = hash((h, int.from_bytes(data[start : start + block_chars], "little")))
        out.append(h)
    return out


class BlockHashes:
    """The chain of one request at one block size, extended on demand."""

    __slots__ = ("_hashes", "_parent", "_tokens", "block_size", "total")

    def __init__(self, request: RouteRequest, block_size: int, max_blocks: int) -> None:
        self.block_size = block_size
        # the engines chain a LoRA request from a per-adapter root (vLLM puts the adapter in the block keys)
        self._parent = chain_root(request.cache_salt, lora_int_id(request.lora)) if request.lora else request.cache_salt
        self._tokens = None
        if request.block_hashes is not None:
            self._hashes = list(request.block_hashes[:max_blocks])
            self.total = len(self._hashes)
        elif request.token_ids is not None:
            self._tokens = request.token_ids
            self._hashes = []
            self.total = min(len(request.token_ids) // block_size, max_blocks)
        elif request.prompt:
            self._hashes = text_hashes(request.prompt, block_size * CHARS_PER_TOKEN, self._parent)[:max_blocks]
            self.total = len(self._hashes)
        else:
            self._hashes = []
            self.total = 0


    def upto(self, n: int) -> list[int]:
        """The chain with at least ``min(n, total)`` hashes computed (the list may hold more)."""
        hashes = self._hashes
        have = len(hashes)
        n = min(n, self.total)
        if have < n and self._tokens is not None:
            bs = self.block_size
            parent = hashes[-1] if have else self._parent
            hashes.extend(chain_hashes(self._tokens[have * bs : n * bs], bs, parent, have))
        return hashes

    def all(self) -> list[int]:
        """Every hash of the chain."""
        return self.upto(self.total)[: self.total]

    @property
    def computed(self) -> int:
        """Hashes computed so far."""
        return len(self._hashes)


def match_lazily(index: PrefixIndex | dict[int, int], chain: BlockHashes, candidates: int) -> dict[int, int]:
    """``PrefixIndex.match`` over a lazily hashed chain (or over a ``hash → mask`` dict such as two indexes'
    union): slot → leading blocks held."""
    return _match((index.masks if isinstance(index, PrefixIndex) else index).get, chain, candidates)


def match_either(a: PrefixIndex, b: PrefixIndex, chain: BlockHashes, candidates: int) -> dict[int, int]:
    """Like ``match_lazily`` where a block counts as held when either index says so (one walk)."""
    ga, gb = a.masks.get, b.masks.get
    out: dict[int, int] = {}
    alive = candidates
    start = 0
    total = chain.total
    while alive and start < total:
        end = min(total, start + CHUNK)
        hashes = chain.upto(end)
        for i in range(start, end):
            h = hashes[i]
            nxt = alive & (ga(h, 0) | gb(h, 0))
            if nxt != alive:
                if i:
                    spread(out, alive & ~nxt, i)
                alive = nxt
                if not alive:
                    return out
        start = end
    if alive and start:
        spread(out, alive, start)
    return out


def _match(get: Callable[[int, int], int], chain: BlockHashes, candidates: int) -> dict[int, int]:
    out: dict[int, int] = {}
    alive = candidates
    start = 0
    total = chain.total
    while alive and start < total:
        end = min(total, start + CHUNK)
        alive = walk(get, chain.upto(end), start, end, alive, out)
        start = end
    if alive and start:
        spread(out, alive, start)
    return out
