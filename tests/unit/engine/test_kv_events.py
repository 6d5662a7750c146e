"""KV-cache events from the engine core, in vLLM's schema, keyed by the one chained block hash."""

from __future__ import annotations

import random

import pytest

from shared.core.engine import Engine, Request, SchedulerConfig
from shared.core.engine.step_time import CalibratedStepTime
from shared.core.kv_events import (
    ROOT_HASH,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
    block_hash,
    chain_hashes,
    chain_root,
    decode_batch,
    encode_batch,
    lora_int_id,
    split_batch,
)
from tests.unit.engine.conftest import make_scheduler, run_step

STEP = CalibratedStepTime(base_s=0.01, per_token_s=1e-5)


def stored(events: list[KVEvent]) -> list[BlockStored]:
    return [e for e in events if isinstance(e, BlockStored)]


def test_events_are_off_by_default() -> None:
    s = make_scheduler(enable_prefix_caching=True)
    s.add_request(Request("a", list(range(40)), max_tokens=2))
    run_step(s)
    assert s.take_kv_events() == []


def test_engine_block_hashes_equal_chain_hashes_of_the_tokens() -> None:
    s = make_scheduler(enable_prefix_caching=True, enable_kv_events=True)
    toks = list(range(1000, 1100))
    r = Request("a", toks, max_tokens=1)
    s.add_request(r)
    run_step(s)
    assert r.block_hashes[:6] == chain_hashes(toks, 16, parent=ROOT_HASH)


def test_a_chain_extended_in_pieces_equals_the_chain_hashed_at_once() -> None:
    toks = list(range(5000, 5000 + 16 * 40 + 7))  # 40 full blocks and a partial one (never hashed)
    whole = chain_hashes(toks, 16)
    assert len(whole) == 40
    pieces = chain_hashes(toks[: 16 * 13], 16)
    pieces += chain_hashes(toks[16 * 13 : 16 * 32], 16, parent=pieces[-1], start=13)
    pieces += [block_hash(pieces[-1], 32, toks[16 * 32 : 16 * 33])]
    pieces += chain_hashes(toks[16 * 33 :], 16, parent=pieces[-1], start=33)
    assert pieces == whole


def test_each_hash_names_the_whole_prefix_not_only_its_block() -> None:
    a = list(range(64))
    b = [*range(16, 32), *range(0, 16), *range(32, 64)]  # the first two blocks swapped
    c = [99, *range(1, 64)]  # first block differs
    ha, hb, hc = chain_hashes(a, 16), chain_hashes(b, 16), chain_hashes(c, 16)
    assert len(set(ha)) == 4
    assert all(x != y for x, y in zip(ha, hb, strict=True))
    assert all(x != y for x, y in zip(ha, hc, strict=True))
    assert chain_hashes(a, 16, parent=1) != ha


def test_salt_and_lora_change_the_root_of_the_chain() -> None:
    s = make_scheduler(enable_prefix_caching=True, enable_kv_events=True, max_loras=1)
    toks = list(range(64))
    a = Request("a", toks, max_tokens=1, cache_salt=7)
    b = Request("b", toks, max_tokens=1, lora="sql-adapter")
    s.add_request(a)
    s.add_request(b)
    run_step(s)
    assert a.block_hashes == chain_hashes(toks, 16, parent=7)
    assert b.block_hashes == chain_hashes(toks, 16, parent=chain_root(ROOT_HASH, lora_int_id("sql-adapter")))
    assert a.block_hashes[0] != b.block_hashes[0] != chain_hashes(toks, 16)[0]


def test_prefill_reports_its_full_blocks_with_tokens_and_no_parent() -> None:
    s = make_scheduler(enable_prefix_caching=True, enable_kv_events=True)
    toks = list(range(40))
    s.add_request(Request("a", toks, max_tokens=4))
    run_step(s)
    ev = s.take_kv_events()
    assert ev == [BlockStored(chain_hashes(toks, 16), None, toks[:32], 16)]
    assert s.take_kv_events() == []  # taken once


def test_decode_filling_a_block_reports_it_with_its_parent() -> None:
    s = make_scheduler(enable_prefix_caching=True, enable_kv_events=True)
    toks = list(range(30))
    r = Request("a", toks, max_tokens=5, sampled_token_ids=[90, 91, 92, 93, 94])
    s.add_request(r)
    run_step(s)
    assert stored(s.take_kv_events())[0].block_hashes == chain_hashes(toks, 16)
    run_step(s)  # computes token 30 (the first output): positions 0..30, block 1 not full yet
    assert s.take_kv_events() == []
    run_step(s)  # computes position 31: block 1 is full
    full = [*toks, 90, 91]
    assert s.take_kv_events() == [BlockStored([chain_hashes(full, 16)[1]], chain_hashes(toks, 16)[0], full[16:32], 16)]


def test_evicting_a_cached_block_reports_its_hash() -> None:
    s = make_scheduler(num_gpu_blocks=4, enable_prefix_caching=True, enable_kv_events=True)
    a = list(range(33))
    s.add_request(Request("a", a, max_tokens=1))
    run_step(s)  # a: 3 blocks (2 hashed), finishes and frees them
    s.take_kv_events()
    s.add_request(Request("b", list(range(500, 540)), max_tokens=1))
    run_step(s)
    ev = s.take_kv_events()
    removed = [e for e in ev if isinstance(e, BlockRemoved)]
    # b needs 3 blocks: the unhashed tail of a first (no event), then a's two cached blocks, tail first
    assert removed == [BlockRemoved([chain_hashes(a, 16)[1]]), BlockRemoved([chain_hashes(a, 16)[0]])]
    assert ev.index(removed[0]) < ev.index(stored(ev)[0])


def test_reset_clears_only_an_idle_cache_and_says_so() -> None:
    s = make_scheduler(enable_prefix_caching=True, enable_kv_events=True)
    r = Request("a", list(range(40)), max_tokens=3)
    s.add_request(r)
    run_step(s)
    s.take_kv_events()
    assert s.reset_prefix_cache() is False
    assert s.take_kv_events() == []
    while s.has_work():
        run_step(s)
    s.take_kv_events()
    assert s.reset_prefix_cache() is True
    assert s.take_kv_events() == [AllBlocksCleared()]
    assert s.kv.cached == {} and s.kv.check_consistency() == []


def test_engine_batches_carry_the_step_end_and_survive_vllm_wire_form() -> None:
    eng = Engine(SchedulerConfig(enable_kv_events=True), STEP, fast_forward=False)
    eng.add_request(Request("a", list(range(48)), max_tokens=2))
    res = eng.step()
    batch = eng.take_kv_events(data_parallel_rank=0)
    assert batch is not None
    assert batch.ts == res.start + res.duration
    assert decode_batch(encode_batch(batch)) == batch
    assert eng.take_kv_events() is None


def _events_of_run(fast_forward: bool) -> list[KVEvent]:
    cfg = SchedulerConfig(num_gpu_blocks=64, enable_kv_events=True, block_size=4)
    eng = Engine(cfg, STEP, fast_forward=fast_forward)
    for i in range(3):
        eng.add_request(Request(f"r{i}", [i] * (10 + i), max_tokens=40 + 7 * i, sampled_token_ids=list(range(60))))
    eng.run_until(1e9)
    out: list[KVEvent] = []
    while (b := eng.take_kv_events()) is not None:
        out += b.events
    return out


def test_a_fast_forwarded_decode_run_reports_the_same_events_as_single_steps() -> None:
    fast = _events_of_run(True)
    slow = _events_of_run(False)
    assert len(stored(slow)) > 10
    assert fast == slow


@pytest.mark.parametrize("seed", range(20))
def test_a_batch_past_the_bound_splits_into_parts_within_it_that_say_the_same_in_order(seed: int) -> None:
    rng = random.Random(seed)
    events: list[KVEvent] = []
    for _ in range(rng.randint(1, 12)):
        n = rng.randint(0, 40)
        kind = rng.random()
        if kind < 0.5:
            hashes = [rng.getrandbits(63) for _ in range(n)]
            events.append(BlockStored(block_hashes=hashes, parent_block_hash=rng.choice([None, 7]),
                                      token_ids=[rng.randint(0, 9) for _ in range(4 * n)], block_size=4, lora_id=3))
        elif kind < 0.9:
            events.append(BlockRemoved(block_hashes=[rng.getrandbits(63) for _ in range(n)]))
        else:
            events.append(AllBlocksCleared())
    batch = KVEventBatch(ts=5.0, events=events, data_parallel_rank=1)
    most = rng.randint(1, 30)
    parts = split_batch(batch, most)
    assert all(p.blocks() <= most and p.ts == 5.0 and p.data_parallel_rank == 1 for p in parts)

    def flat(bs: list[KVEventBatch]) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        for b in bs:
            for e in b.events:
                out += [("cleared", 0)] if isinstance(e, AllBlocksCleared) else [
                    (type(e).__name__, h) for h in e.block_hashes]
        return out

    assert flat(parts) == flat([batch])  # the same blocks, the same order
    for e in (e for p in parts for e in p.events):
        if isinstance(e, BlockStored):
            assert len(e.token_ids) == 4 * len(e.block_hashes) and e.lora_id == 3


def test_a_stored_run_cut_in_parts_goes_on_from_each_parts_last_block() -> None:
    run = BlockStored(block_hashes=list(range(100, 110)), parent_block_hash=42, token_ids=list(range(20)),
                      block_size=2)
    parts = split_batch(KVEventBatch(ts=1.0, events=[run]), 4)
    pieces = [e for p in parts for e in p.events]
    assert all(isinstance(e, BlockStored) for e in pieces)
    assert [(e.parent_block_hash, e.block_hashes, e.token_ids) for e in pieces] == [  # type: ignore[union-attr]
        (42, [100, 101, 102, 103], list(range(0, 8))),
        (103, [104, 105, 106, 107], list(range(8, 16))),
        (107, [108, 109], list(range(16, 20))),
    ]


def test_a_batch_within_the_bound_is_left_whole() -> None:
    batch = KVEventBatch(ts=1.0, events=[BlockRemoved(block_hashes=[1, 2, 3])])
    assert split_batch(batch, 3) == [batch]
