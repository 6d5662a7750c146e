"""The bounded prefix index: longest gap-free match per endpoint, LRU bound, removals, lazy hashing."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.core.kv_events import chain_hashes
from shared.core.routing import RouteRequest
from shared.core.routing.hashing import BlockHashes, ChunkMemo, match_lazily, text_hashes
from shared.core.routing.prefix_index import PrefixIndex
from tests.unit.routing.helpers import req

ALL = 0b111


def test_match_counts_leading_blocks_per_endpoint() -> None:
    idx = PrefixIndex()
    idx.add(0, [1, 2, 3])
    idx.add(1, [1, 2])
    idx.add(2, [9])
    assert idx.match([1, 2, 3, 4], ALL) == {0: 3, 1: 2}


def test_a_block_after_a_gap_does_not_count() -> None:
    idx = PrefixIndex()
    idx.add(0, [1, 3])
    assert idx.match([1, 2, 3], ALL) == {0: 1}


def test_match_ignores_endpoints_outside_the_candidates() -> None:
    idx = PrefixIndex()
    idx.add(0, [1, 2])
    idx.add(1, [1, 2])
    assert idx.match([1, 2], 0b10) == {1: 2}


def test_lru_evicts_the_least_recently_used_block_of_that_endpoint_only() -> None:
    idx = PrefixIndex(capacity=3)
    idx.add(0, [1, 2, 3])
    idx.add(1, [1])
    idx.add(0, [1])  # touch 1: now 2 is the oldest of endpoint 0
    idx.add(0, [4])
    assert idx.match([1], ALL) == {0: 1, 1: 1}
    assert idx.masks.get(2) is None
    assert idx.blocks_of(0) == 3


def test_remove_and_clear_forget_blocks() -> None:
    idx = PrefixIndex()
    idx.add(0, [1, 2])
    idx.add(1, [1, 2])
    idx.remove(0, [2, 99])
    assert idx.match([1, 2], ALL) == {0: 1, 1: 2}
    idx.clear(1)
    assert idx.match([1, 2], ALL) == {0: 1}
    assert idx.entries() == 1


def test_lazy_match_equals_full_match_and_hashes_only_what_it_needs() -> None:
    r = req(tokens=4000, seed=3)
    full = chain_hashes(list(r.token_ids or ()), 16)
    idx = PrefixIndex()
    idx.add(0, full[:10])
    chain = BlockHashes(r, 16, 10_000)
    assert match_lazily(idx, chain, 1) == {0: 10} == idx.match(full, 1)
    assert chain.computed < 50  # first chunk 16, then 32: stops at the first miss
    assert chain.all() == full


def test_text_hashes_are_stable_and_chained() -> None:
    a = text_hashes("x" * 200, 64, 0)
    assert len(a) == 3
    assert a == text_hashes("x" * 200 + "tail", 64, 0)
    assert text_hashes("y" + "x" * 199, 64, 0)[1] != a[1]  # chained: a different first block changes the rest


def test_text_hashes_read_only_the_blocks_they_keep() -> None:
    text = "aé€😀" * 5_000  # one to four bytes a character
    whole = text_hashes(text, 64, 7)
    for n in (0, 1, 3, len(whole), len(whole) + 5):
        assert text_hashes(text, 64, 7, n) == whole[:n]


def test_text_past_the_kept_blocks_is_never_read() -> None:
    # a lone surrogate cannot be encoded: reading past the 100 kept blocks would raise
    text = "x" * (64 * 100) + "\ud800" * (1 << 20)
    assert text_hashes(text, 64, 0, 100) == text_hashes("x" * (64 * 100), 64, 0)


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 5), st.lists(st.integers(0, 40), max_size=30)), max_size=60),
       cap=st.integers(1, 20))
def test_index_never_exceeds_capacity_per_endpoint_and_masks_agree(ops: list[tuple[int, list[int]]], cap: int) -> None:
    idx = PrefixIndex(capacity=cap)
    for slot, hashes in ops:
        idx.add(slot, hashes)
    for slot in range(6):
        assert idx.blocks_of(slot) <= cap
    assert idx.entries() <= 6 * cap
    assert len(idx) <= idx.entries()
    for h, mask in idx.masks.items():
        assert mask != 0
        for slot in range(6):
            assert bool(mask >> slot & 1) == idx.holds(slot, h)


def test_lora_and_salted_requests_hash_like_the_engine() -> None:
    from shared.core.engine import KVCache, Request

    tokens = list(range(64))
    for lora, salt in ((None, 0), ("adapter-a", 0), (None, 7), ("adapter-a", 7)):
        eng = Request("e", tokens, max_tokens=1, cache_salt=salt, lora=lora)
        kv = KVCache(2, 16)
        engine_hashes = [kv.hash_at(eng, b) for b in range(4)]
        ours = BlockHashes(RouteRequest("r", "m", token_ids=tokens, lora=lora, cache_salt=salt), 16, 100).all()
        assert ours == engine_hashes


_OPS = st.lists(st.tuples(st.sampled_from(["a-add", "b-add", "a-rm", "b-rm", "a-clear", "b-clear"]),
                          st.integers(0, 3), st.lists(st.integers(0, 12), max_size=6)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(_OPS)
def test_mirrored_union_is_always_the_or_of_both_indexes(ops: list[tuple[str, int, list[int]]]) -> None:
    a, b = PrefixIndex(capacity=5), PrefixIndex()
    union = a.mirror(b)
    for op, slot, hashes in ops:
        idx = a if op[0] == "a" else b
        if op.endswith("add"):
            idx.add(slot, hashes)
        elif op.endswith("rm"):
            idx.remove(slot, hashes)
        else:
            idx.clear(slot)
        expected = {h: a.masks.get(h, 0) | b.masks.get(h, 0) for h in a.masks.keys() | b.masks.keys()}
        assert union == expected


def test_hybrid_match_over_the_union_equals_matching_either_index() -> None:
    spec, precise = PrefixIndex(), PrefixIndex()
    union = spec.mirror(precise)
    spec.add(0, [1, 2])
    precise.add(0, [3])
    precise.add(1, [1, 2, 3, 4])
    spec.add(2, [1])
    chain = BlockHashes(RouteRequest("r", "m", block_hashes=[1, 2, 3, 4, 5]), 16, 100)
    assert match_lazily(union, chain, ALL) == {0: 3, 1: 4, 2: 1}


def _reference_match(held: dict[int, set[int]], hashes: list[int], candidates: int) -> dict[int, int]:
    """Block by block, per slot: the leading blocks it holds without a gap (0 is left out)."""
    out = {}
    for slot, blocks in held.items():
        if not candidates >> slot & 1:
            continue
        n = 0
        while n < len(hashes) and hashes[n] in blocks:
            n += 1
        if n:
            out[slot] = n
    return out


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.integers(0, 9), st.sets(st.integers(0, 40), max_size=40), max_size=10),
       st.lists(st.integers(0, 40), max_size=90), st.integers(0, 1023))
def test_the_bisecting_walk_matches_block_by_block(held: dict[int, set[int]], hashes: list[int],
                                                   candidates: int) -> None:
    idx = PrefixIndex()
    for slot, blocks in held.items():
        idx.add(slot, sorted(blocks))
    assert idx.match(hashes, candidates) == _reference_match(held, hashes, candidates)
    chain = BlockHashes(RouteRequest("r", "m", block_hashes=hashes), 16, 8192)  # chunked (32 blocks a round)
    assert match_lazily(idx, chain, candidates) == _reference_match(held, hashes, candidates)


def test_chunk_memo_gives_the_chain_hashes_and_reuses_a_repeated_prefix() -> None:
    memo = ChunkMemo(64)
    shared = list(range(1000, 1000 + 2048))  # 128 blocks: four whole chunks
    a = RouteRequest("a", "m", token_ids=shared + [7] * 1000)
    b = RouteRequest("b", "m", token_ids=shared + [9] * 1000)
    for r in (a, b):
        chain = BlockHashes(r, 16, 10_000, memo)
        assert chain.upto(190) == chain_hashes(list(r.token_ids or ()), 16)  # 190 blocks: 5 whole chunks + 30
    assert memo.hits == 4 and memo.misses == 5 + 1  # b reuses the four shared chunks, hashes its fifth
    assert BlockHashes(b, 16, 10_000, memo).all() == chain_hashes(list(b.token_ids or ()), 16)


def test_chunk_memo_compares_tokens_so_a_key_collision_only_costs_a_miss() -> None:
    memo = ChunkMemo(8)
    first = [5] + [1] * 255 + [2] + [1] * 254 + [3]  # first, middle and last tokens of its first chunk: 5, 2, 3
    other = [5] + [4] * 255 + [2] + [4] * 254 + [3]  # the same three, different contents
    for tokens in (first, other, first):
        r = RouteRequest("r", "m", token_ids=tokens)
        assert BlockHashes(r, 16, 100, memo).upto(32) == chain_hashes(tokens, 16)
    assert memo.hits == 0 and memo.misses == 3


def test_chunk_memo_and_salted_roots_never_mix_chains() -> None:
    memo = ChunkMemo(8)
    tokens = list(range(600))
    for salt, lora in ((0, None), (7, None), (0, "adapter-a"), (0, None)):
        r = RouteRequest("r", "m", token_ids=tokens, cache_salt=salt, lora=lora)
        assert BlockHashes(r, 16, 100, memo).upto(32) == BlockHashes(r, 16, 100).upto(32)
    assert memo.hits == 1  # only the repeat of the unsalted request


@settings(max_examples=50, deadline=None)
@given(prompts=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 900)), min_size=1, max_size=12),
       capacity=st.integers(1, 6))
def test_chunk_memo_is_bounded_and_never_changes_a_chain(prompts: list[tuple[int, int]], capacity: int) -> None:
    memo = ChunkMemo(capacity)
    for group, tail in prompts:  # prompts of a few groups: a 1,100-token shared part, then their own tokens
        tokens = [group] * 1100 + list(range(tail))
        r = RouteRequest("r", "m", token_ids=tokens)
        got = BlockHashes(r, 16, 10_000, memo).upto(10_000)
        assert got == chain_hashes(tokens, 16)
        assert len(memo) <= capacity


def test_router_hash_memo_can_be_turned_off_and_is_checked() -> None:
    from shared.core.routing import DataConfig, PoolState

    assert PoolState(DataConfig(hash_memo_chunks=0)).chunk_memo is None
    assert PoolState().chunk_memo is not None
    with pytest.raises(ValueError, match="hash_memo_chunks"):
        PoolState(DataConfig(hash_memo_chunks=-1))


def test_a_match_probes_the_first_unseen_chunk_before_hashing_all_of_it() -> None:
    memo = ChunkMemo(64)
    shared = list(range(5000, 5000 + 2048))  # 128 blocks
    idx = PrefixIndex()
    first = RouteRequest("a", "m", token_ids=shared + [1] * 1000)
    idx.add(0, chain_hashes(list(first.token_ids or ()), 16)[:128])  # an endpoint holds the shared part
    for seen in range(2):
        chain = BlockHashes(RouteRequest("b", "m", token_ids=shared + [2 + seen] * 1000), 16, 10_000, memo)
        assert match_lazily(idx, chain, 1) == {0: 128}
        assert chain.computed == 128 + 8  # the divergent chunk: its first 8 blocks told the match where it ends
    assert memo.hits == 4  # the second prompt reused the four shared chunks


@settings(max_examples=60, deadline=None)
@given(prompts=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1500)), min_size=1, max_size=8),
       held=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2), st.integers(0, 120)), max_size=6))
def test_matches_with_the_memo_equal_full_matches(prompts: list[tuple[int, int]],
                                                  held: list[tuple[int, int, int]]) -> None:
    memo = ChunkMemo(16)
    idx = PrefixIndex()
    base = {g: [g] * 1100 for g in range(3)}
    for slot, group, blocks in held:  # endpoints holding some of a group's shared part and a tail
        idx.add(slot, chain_hashes(base[group] + list(range(900)), 16)[:blocks])
    for group, tail in prompts:
        tokens = base[group] + list(range(tail))
        chain = BlockHashes(RouteRequest("r", "m", token_ids=tokens), 16, 10_000, memo)
        full = chain_hashes(tokens, 16)
        assert match_lazily(idx, chain, 0b1111) == idx.match(full, 0b1111)
        assert chain.all() == full


def test_chunk_memo_hashes_tokens_beyond_64_bits_every_time_and_never_stores_them() -> None:
    memo = ChunkMemo(8)
    tokens = [1 << 70, *range(1, 600)]  # the first chunk cannot be packed as 64-bit integers
    for _ in range(2):
        r = RouteRequest("r", "m", token_ids=tokens)
        assert BlockHashes(r, 16, 100, memo).upto(32) == chain_hashes(tokens, 16)[:32]
    assert memo.hits == 0 and len(memo) == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_routers_with_and_without_the_hash_memo_decide_alike(seed: int) -> None:
    """The memo only saves hashing: on a seeded pool and workload (tenants sharing prefixes that end on and
    off chunk boundaries, KV events of where requests went), every decision equals the memo-less router's."""
    from shared.core.kv_events import BlockStored, KVEventBatch
    from shared.core.routing import Endpoint, EndpointMetrics, Router, builtin_config

    rng = random.Random(seed)
    routers = [Router(builtin_config("default"), seed=seed) for _ in range(2)]
    routers[1].state.chunk_memo = None
    for i in range(12):
        m = EndpointMetrics(ts=0.0, waiting=rng.randrange(3), running=rng.randrange(40), kv_usage=rng.random() * 0.6)
        for r in routers:
            r.state.upsert(Endpoint(id=f"e{i}", model="m", address=f"h{i}:1", num_gpu_blocks=4000))
            r.update_metrics(f"e{i}", m)
    prefixes = [[t * 7919 + k for k in range(rng.choice((512, 700, 1024, 1500)))] for t in range(6)]
    for n in range(150):
        tokens = rng.choice(prefixes) + [rng.randrange(50_000) for _ in range(rng.randrange(0, 900))]
        outs = [r.route(RouteRequest(f"q{n}", "m", token_ids=list(tokens)), 0.0) for r in routers]
        assert outs[0] == outs[1]
        target = getattr(outs[0], "endpoint", None)
        for r in routers:
            if target is not None and n % 3:  # some decisions' KV events arrive, others only assumed
                r.apply_kv_events(target, KVEventBatch(ts=0.0, events=[BlockStored(chain_hashes(tokens, 16), None,
                                                                                   [], 16)]))
            if n >= 8:
                r.finished(f"q{n - 8}")
    memo = routers[0].state.chunk_memo
    assert memo is not None and memo.hits > 0  # the memo did serve chunks
