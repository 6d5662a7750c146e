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

import struct
from collections.abc import Callable, Sequence

from shared.core.kv_events import chain_hashes, chain_root, lora_int_id
from shared.core.routing.domain import RouteRequest
from shared.core.routing.prefix_index import PrefixIndex, spread, walk

CHARS_PER_TOKEN = 4
CHUNK = 32  # blocks hashed per round of a match: hashing stops at most this far past the longest match
PROBE = 8  # blocks of a chunk the memo does not hold that a match hashes before the rest


def text_hashes(text: str, block_chars: int, parent: int, max_blocks: int | None = None) -> list[int]:
    """Chained hashes of full ``block_chars`` blocks of ``text`` (an int of the UTF-8 bytes per block, so
    the value is the same in every process: only str/bytes hashing is salted by PYTHONHASHSEED); at most
    ``max_blocks`` of them, and only as much of the text read as they need."""
    out: list[int] = []
    h = parent
    if max_blocks is not None:
        # every character is at least one byte: these characters hold the first max_blocks byte blocks whole
        text = text[: max(0, max_blocks) * block_chars]
    data = text.encode("utf-8")
    end = len(data) - block_chars + 1
    if max_blocks is not None:
        end = min(end, max(0, max_blocks) * block_chars)
    for start in range(0, end, block_chars):
        h = hash((h, int.from_bytes(data[start : start + block_chars], "little")))
        out.append(h)
    return out


class ChunkMemo:
    """The chained hashes of recently hashed prompt chunks (``CHUNK`` blocks), keyed by the hash before the
    chunk, its position and a few of its tokens, kept with the chunk's tokens: a prompt repeating a seen
    prefix (a system prompt, a conversation's earlier turns) reuses them after a token-for-token comparison
    instead of hashing again.

    The hashing a match needs grows with the prefix the candidates hold, and a held prefix is content the
    router has seen before: that is where this memo pays. At most ``capacity`` chunks, least recently used
    dropped first (each holds its ``CHUNK × block_size`` tokens packed as 64-bit integers and ``CHUNK`` hashes).

    Why packed: comparing two lists of distinct int objects costs a rich comparison per token (more than
    hashing them on CPython 3.11), while packing the request's tokens reads each once and the comparison
    is then one ``memcmp`` over a compact buffer, not a walk over another request's scattered ints. A chunk
    holding a token outside the signed 64-bit range is never memoised (it is hashed every time).
    """

    __slots__ = ("_chunks", "capacity", "hits", "misses")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"chunk memo capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._chunks: dict[tuple[int, ...], tuple[bytes, list[int]]] = {}  # oldest first
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._chunks)

    @staticmethod
    def _key(tokens: Sequence[int], parent: int, start: int, lo: int = 0, hi: int | None = None) -> tuple[int, ...]:
        # the parent names the prefix before the chunk (the root, the same for all, before the first one),
        # three of its tokens tell contents apart; the tokens must then match one for one
        if hi is None:
            hi = len(tokens)
        if hi <= lo:
            return (parent, start)
        return (parent, start, tokens[lo], tokens[lo + (hi - lo) // 2], tokens[hi - 1])

    def get(self, tokens: Sequence[int], parent: int, start: int) -> list[int] | None:
        """The chunk's hashes when these tokens were hashed after this parent at this position, else None."""
        return self.lookup(tokens, 0, len(tokens), parent, start)

    def lookup(self, tokens: Sequence[int], lo: int, hi: int, parent: int, start: int) -> list[int] | None:
        """``get(tokens[lo:hi], parent, start)`` without copying the chunk unless its key is held (a prompt's
        first unseen chunk, where a match mostly ends, is then read only as far as it is hashed)."""
        key = self._key(tokens, parent, start, lo, hi)
        got = self._chunks.pop(key, None)
        if got is None or got[0] != _pack(tokens[lo:hi]):
            self.misses += 1
            return None
        self.hits += 1
        self._chunks[key] = got  # reinserted last: most recent
        return got[1]

    def put(self, tokens: Sequence[int], parent: int, start: int, hashes: list[int]) -> None:
        """Remember a chunk's hashes (the least recently used chunk goes when full)."""
        packed = _pack(tokens)
        if packed is None:
            return
        chunks = self._chunks
        key = self._key(tokens, parent, start)
        chunks.pop(key, None)
        if len(chunks) >= self.capacity:
            del chunks[next(iter(chunks))]
        chunks[key] = (packed, hashes)

    def hashes(self, tokens: Sequence[int], block_size: int, parent: int, start: int) -> list[int]:
        """``chain_hashes(tokens, block_size, parent, start)``, from the memo when it holds them."""
        got = self.get(tokens, parent, start)
        if got is None:
            got = chain_hashes(tokens, block_size, parent, start)
            self.put(tokens, parent, start, got)
        return got


_PACKERS: dict[int, struct.Struct] = {}  # token count → its packer (chunks have one or two lengths)


def _pack(tokens: Sequence[int]) -> bytes | None:
    """``tokens`` as little-endian signed 64-bit integers; None when one does not fit (or is not an int)."""
    n = len(tokens)
    packer = _PACKERS.get(n)
    if packer is None:
        packer = struct.Struct(f"<{n}q")
        if len(_PACKERS) < 64:
            _PACKERS[n] = packer
    try:
        return packer.pack(*tokens)
    except (struct.error, TypeError):
        return None


class BlockHashes:
    """The chain of one request at one block size, extended on demand."""

    __slots__ = ("_hashes", "_memo", "_parent", "_probed", "_tokens", "block_size", "total")

    def __init__(self, request: RouteRequest, block_size: int, max_blocks: int, memo: ChunkMemo | None = None) -> None:
        self.block_size = block_size
        self._memo = memo
        self._probed: tuple[int, int] | None = None  # (parent, first block) of a chunk hashed only in part so far
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
            self._hashes = text_hashes(request.prompt, block_size * CHARS_PER_TOKEN, self._parent, max_blocks)
            self.total = len(self._hashes)
        else:
            self._hashes = []
            self.total = 0

    def upto(self, n: int) -> list[int]:
        """The chain with at least ``min(n, total)`` hashes computed (the list may hold more); whole chunks
        come from the memo when it holds them."""
        return self._extend(n, self._memo, probe=False)

    def reach(self, n: int) -> list[int]:
        """Like ``upto``, but a whole chunk the memo does not hold is hashed ``PROBE`` blocks first and the
        chain returned short of ``n``: a match mostly ends in the first chunk the router has not seen
        (where a prompt leaves the prefix it shares), so its other blocks are hashed only if asked again."""
        return self._extend(n, self._memo, probe=True)

    def all(self) -> list[int]:
        """Every hash of the chain (the rest hashed at once, past the memo: after the prefix a match walked,
        the prompt is mostly its own, and its chunks would only push shared ones out)."""
        return self._extend(self.total, None, probe=False)[: self.total]

    def _extend(self, n: int, memo: ChunkMemo | None, probe: bool) -> list[int]:
        hashes = self._hashes
        have = len(hashes)
        n = min(n, self.total)
        tokens = self._tokens
        if have >= n or tokens is None:
            return hashes
        bs = self.block_size
        if memo is None or not isinstance(tokens, list | tuple):
            hashes.extend(chain_hashes(tokens[have * bs : n * bs], bs, hashes[-1] if have else self._parent, have))
            return hashes
        while have < n:
            # whole chunks on CHUNK boundaries go through the memo; a partial one (the prompt's end, or the
            # rest of a probed chunk) is hashed, and a probed chunk completed here is remembered
            end = min(n, have - have % CHUNK + CHUNK)
            parent = hashes[-1] if have else self._parent
            if end - have == CHUNK:
                lo, hi = have * bs, end * bs
                got = memo.lookup(tokens, lo, hi, parent, have)
                if got is None:
                    if probe:
                        self._probed = (parent, have)
                        hashes.extend(chain_hashes(tokens[lo : lo + PROBE * bs], bs, parent, have))
                        return hashes
                    piece = tokens[lo:hi]
                    got = chain_hashes(piece, bs, parent, have)
                    memo.put(piece, parent, have, got)
                hashes.extend(got)
            else:
                hashes.extend(chain_hashes(tokens[have * bs : end * bs], bs, parent, have))
                p = self._probed
                if p is not None and end == p[1] + CHUNK:
                    memo.put(tokens[p[1] * bs : end * bs], p[0], p[1], hashes[p[1] : end])
                    self._probed = None
            have = end
        return hashes

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
        end = min(total, start - start % CHUNK + CHUNK)  # to the next chunk boundary, where the memo keys are
        hashes = chain.reach(end)
        end = min(end, len(hashes))
        alive = walk(get, hashes, start, end, alive, out)
        start = end
    if alive and start:
        spread(out, alive, start)
    return out
