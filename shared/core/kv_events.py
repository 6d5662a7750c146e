"""KV-cache events: what an engine's prefix cache gained or lost, in vLLM's event schema.

One home for the events the engine emulator emits and the routing core consumes (precise prefix
scoring). The shape follows vLLM's ``vllm.distributed.kv_events`` (v0.33): a batch carries a timestamp
and a list of events; ``BlockStored`` names the chained hashes of newly cached full blocks, the hash of
the block before the first one (``None`` at the start of a sequence), their tokens, the block size and
the LoRA adapter; ``BlockRemoved`` names evicted hashes; ``AllBlocksCleared`` says the cache was reset.
vLLM encodes these with msgpack as tagged arrays (``array_like=True``, tag = the class name), which
``encode_batch`` reproduces so a third-party consumer of vLLM's events can read Gantry's.

The chained block hash is ``chain_hashes``: one function for the engine's cache and the router's
prefix index, so a router hashing a request's tokens finds exactly the keys the engine reported.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from itertools import accumulate, count
from operator import xor
from typing import Annotated

import msgspec

MAX_BATCH_BLOCKS = 65_536
"""Block hashes one batch may carry in all: an engine step stores or frees far fewer (its token budget over the
block size: 512 at 8,192 tokens of 16), and one message applies at once, on the loop of whoever follows the engine
(unbounded, 8 MB of hashes held a picker's loop 170-600 ms)."""
Hashes = Annotated[list[int], msgspec.Meta(max_length=MAX_BATCH_BLOCKS)]


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True, frozen=True):
    """Base of the three event kinds (tagged by class name, as vLLM does)."""


class BlockStored(KVCacheEvent, frozen=True):
    """Full blocks entered the prefix cache, in sequence order."""

    block_hashes: Hashes
    parent_block_hash: int | None
    token_ids: Annotated[list[int], msgspec.Meta(max_length=MAX_BATCH_BLOCKS * 16)]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None


class BlockRemoved(KVCacheEvent, frozen=True):
    """Blocks left the prefix cache (evicted or freed without a hash)."""

    block_hashes: Hashes
    medium: str | None = None


class AllBlocksCleared(KVCacheEvent, frozen=True):
    """The engine dropped every cached block (reset)."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, frozen=True):
    """Events of one engine step (or one flush), stamped with the engine's clock in seconds."""

    ts: float
    events: Annotated[list[KVEvent], msgspec.Meta(max_length=MAX_BATCH_BLOCKS)]
    data_parallel_rank: int | None = None

    def blocks(self) -> int:
        """Block hashes carried in all."""
        return sum(len(e.block_hashes) for e in self.events if not isinstance(e, AllBlocksCleared))


def split_batch(batch: KVEventBatch, most: int = MAX_BATCH_BLOCKS) -> list[KVEventBatch]:
    """``batch`` as consecutive batches of at most ``most`` block hashes each, in order (a long fast-forward's
    events in one batch would be refused whole by the engine's followers). A stored run cut in two goes on from
    its last block: the second part's parent is the first part's last hash."""
    if batch.blocks() <= most:
        return [batch]
    parts: list[KVEventBatch] = []
    events: list[KVEvent] = []
    room = most

    def close() -> None:
        nonlocal events, room
        if events:
            parts.append(KVEventBatch(ts=batch.ts, events=events, data_parallel_rank=batch.data_parallel_rank))
        events, room = [], most

    for ev in batch.events:
        if isinstance(ev, AllBlocksCleared):
            events.append(ev)
            continue
        hashes, start = ev.block_hashes, 0
        while start < len(hashes):
            if room == 0:
                close()
            take = hashes[start:start + room]
            if isinstance(ev, BlockStored):
                parent = ev.parent_block_hash if start == 0 else hashes[start - 1]
                tokens = ev.token_ids[start * ev.block_size:(start + len(take)) * ev.block_size]
                events.append(BlockStored(block_hashes=take, parent_block_hash=parent, token_ids=tokens,
                                          block_size=ev.block_size, lora_id=ev.lora_id, medium=ev.medium))
            else:
                events.append(BlockRemoved(block_hashes=take, medium=ev.medium))
            start += len(take)
            room -= len(take)
    close()
    return parts


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KVEventBatch)


def encode_batch(batch: KVEventBatch) -> bytes:
    """The batch in vLLM's msgpack wire form."""
    return _encoder.encode(batch)


def decode_batch(data: bytes) -> KVEventBatch:
    """A batch from vLLM's msgpack wire form; raises ``msgspec.ValidationError`` or ``DecodeError``."""
    return _decoder.decode(data)


ROOT_HASH = 0  # parent of a sequence's first block when no cache salt is given
_LORA_TAG = 0x10_5A  # keeps (salt, lora id) roots apart from any block hash of tokens


def lora_int_id(name: str) -> int:
    """A LoRA adapter's integer id, the same in every process (CRC-32 of its name, never 0)."""
    return (zlib.crc32(name.encode()) & 0x7FFF_FFFF) or 1


def chain_root(salt: int = ROOT_HASH, lora_id: int | None = None) -> int:
    """Parent of a sequence's first block: the cache salt, mixed with the LoRA id when one is used.

    vLLM puts the adapter and the salt in the block hash's extra keys, so the same tokens under two
    adapters never share blocks; chaining from a per-adapter root gives the same separation.
    """
    return salt if lora_id is None else hash((salt, lora_id, _LORA_TAG))


def chain_hashes(token_ids: Sequence[int], block_size: int, parent: int = ROOT_HASH, start: int = 0) -> list[int]:
    """Chained hashes of every *full* block of ``token_ids``: ``h_i = h_{i-1} XOR H(i, tokens of block i)``.

    ``H`` is Python's tuple-of-int hash (the same in every process: ``PYTHONHASHSEED`` salts only str and
    bytes) of the block's position and tokens, so ``h_i`` names the chain's root and every block up to i
    (a collision needs two 64-bit pseudo-random sums to agree). Position in the tuple keeps reordered blocks
    apart. ``parent`` is the hash of the block before the first one given (the chain's root, a cache salt or
    LoRA id, ``ROOT_HASH`` when none) and ``start`` that first block's index in the sequence, so a chain
    can be extended block by block (engines) or in chunks (routers) to the same values.

    Why this shape: a router hashes every prompt it routes, and hashing is most of a decision's cost in
    Python. Here the per-block tuples, their hashes and the chaining all run in C (``zip`` over one
    iterator, ``map(hash)``, ``accumulate(xor)``), about half the cost of hashing ``(parent, *block)`` in a
    Python loop (``bench/routing_core.py``).
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    it = iter(token_ids)  # zip over one iterator repeated: consecutive blocks; a partial last block is dropped
    out = list(accumulate(map(hash, zip(count(start), *[it] * block_size)), xor, initial=parent))
    del out[0]
    return out


def block_hash(parent: int, index: int, tokens: Sequence[int]) -> int:
    """The chained hash of one full block (``chain_hashes`` of that block alone)."""
    return parent ^ hash((index, *tokens))
