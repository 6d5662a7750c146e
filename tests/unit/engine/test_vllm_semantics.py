"""The four vLLM v0.33 behaviours of issue 14 item 1, hand-driven step by step (vLLM v1 scheduler-test style)."""

from __future__ import annotations

from shared.core.engine import Request, RequestStatus
from shared.core.kv_events import BlockRemoved, chain_hashes
from tests.unit.engine.conftest import counts, ids, make_requests, make_scheduler, run_step

# -- 1. freeing: unhashed blocks to the front, hashed ones to the back (tail of the request first) -------


def test_freed_unhashed_blocks_go_to_the_front_and_hashed_ones_to_the_back_in_reverse() -> None:
    s = make_scheduler(num_gpu_blocks=8, enable_prefix_caching=True)
    r = Request("r", list(range(40)), max_tokens=1)  # blocks 1, 2 full (hashed), 3 partial
    s.add_request(r)
    s.schedule()
    assert r.block_ids == [1, 2, 3]
    assert s.kv.free_list() == [4, 5, 6, 7]
    s.kv.free(r)
    assert s.kv.free_list() == [3, 4, 5, 6, 7, 2, 1]


def test_with_caching_off_every_freed_block_goes_to_the_back() -> None:
    s = make_scheduler(num_gpu_blocks=8, enable_prefix_caching=False)
    r = Request("r", list(range(40)), max_tokens=1)
    s.add_request(r)
    s.schedule()
    s.kv.free(r)
    assert s.kv.free_list() == [4, 5, 6, 7, 3, 2, 1]


def test_a_preempted_request_frees_its_blocks_in_the_same_order() -> None:
    s = make_scheduler(num_gpu_blocks=11, max_num_batched_tokens=100, enable_prefix_caching=True)
    r0, r1 = make_requests(2, 72)  # 4 full blocks + 8 tokens each; no content shared between them
    s.add_request(r0)
    out0 = s.schedule()
    s.add_request(r1)
    s.schedule()
    assert r1.block_ids == [6, 7, 8, 9, 10]
    s.update_from_output(out0, 0.0)
    for _ in range(20):  # r0 decodes into its fifth block until it needs a sixth: r1 is preempted
        out = s.schedule()
        s.update_from_output(out, 0.0)
        if out.preempted:
            break
    assert ids(out.preempted) == ["r1"]
    # r1's partial block 10 went to the front and was reused at once; its hashed blocks wait, tail first
    assert len(r0.block_ids) == 6 and r0.block_ids[5] == 10
    assert s.kv.free_list() == [9, 8, 7, 6]


# -- 2. long_prefill_token_threshold never caps a lone request ----------------------------------------


def test_a_lone_request_is_not_capped_by_the_long_prefill_threshold() -> None:
    s = make_scheduler(max_num_batched_tokens=1024, long_prefill_token_threshold=400)
    (r0,) = make_requests(1, 2000)
    s.add_request(r0)
    assert counts(run_step(s)) == {"r0": 1024}  # only request running or waiting: the budget is its cap


def test_the_threshold_applies_again_once_a_second_request_arrives() -> None:
    s = make_scheduler(max_num_batched_tokens=1024, long_prefill_token_threshold=400)
    r0, r1 = make_requests(2, 2000)
    s.add_request(r0)
    assert counts(run_step(s)) == {"r0": 1024}
    s.add_request(r1)
    assert counts(run_step(s)) == {"r0": 400, "r1": 400}


def test_a_lone_running_request_is_capped_while_another_one_waits() -> None:
    s = make_scheduler(max_num_batched_tokens=1024, long_prefill_token_threshold=400, max_num_seqs=1)
    r0, r1 = make_requests(2, 2000)
    s.add_request(r0)
    s.add_request(r1)
    assert counts(run_step(s)) == {"r0": 400}  # r1 cannot be admitted (max_num_seqs) but is waiting


# -- 3. priority: a request that is its own preemption victim does not end the running pass ------------


def test_priority_self_preemption_goes_on_with_the_remaining_running_requests() -> None:
    s = make_scheduler(num_gpu_blocks=5, max_num_batched_tokens=200, max_num_seqs=2, policy="priority")
    low = Request("low", [1] * 31, max_tokens=20, priority=1, arrival_time=0.0)
    high = Request("high", [2] * 20, max_tokens=20, priority=0, arrival_time=1.0)
    s.add_request(low)
    assert counts(run_step(s)) == {"low": 31}  # 2 blocks
    s.add_request(high)
    assert counts(run_step(s)) == {"low": 1, "high": 20}  # low fills its 32 slots; high takes the last 2 blocks
    assert s.kv.num_free == 0 and ids(s.running) == ["low", "high"]
    out = run_step(s)  # low needs a third block; the lowest-priority running request is low itself
    assert ids(out.preempted) == ["low"]
    assert counts(out) == {"high": 1}  # the pass went on to high instead of stopping
    assert low.status is RequestStatus.PREEMPTED and ids(s.waiting) == ["low"]


def test_priority_victim_ties_go_to_the_earliest_in_running_order() -> None:
    # vLLM v0.33 takes max(running, key=(priority, arrival_time)): equal keys keep the first, whatever the ids
    s = make_scheduler(num_gpu_blocks=4, max_num_batched_tokens=200, max_num_seqs=2, policy="priority")
    first = Request("first", [1] * 16, max_tokens=20, priority=1, arrival_time=0.0)
    second = Request("second", [2] * 16, max_tokens=20, priority=1, arrival_time=0.0)
    s.add_request(first)
    s.add_request(second)
    assert counts(run_step(s)) == {"first": 16, "second": 16}
    assert ids(s.running) == ["first", "second"] and s.kv.num_free == 1
    out = run_step(s)  # first takes the last block; second needs one too: the victim is first, not second
    assert ids(out.preempted) == ["first"] and counts(out) == {"second": 1}


# -- 4. several blocks may hold one hash; evicting one removes only that block id ------------------------


def test_content_computed_twice_is_cached_in_two_blocks_and_evicting_one_keeps_the_other() -> None:
    s = make_scheduler(num_gpu_blocks=5, enable_prefix_caching=True, enable_kv_events=True)
    prompt = list(range(32))
    h0, h1 = chain_hashes(prompt, 16)
    s.add_request(Request("a", prompt, max_tokens=1))
    run_step(s)  # a: blocks [1, 2] hold h0, h1; a finishes, both stay cached in the free list
    assert s.kv.free_list() == [3, 4, 2, 1]
    b = Request("b", prompt, max_tokens=1)
    s.add_request(b)
    run_step(s)  # b may hit only block 1 (never the last token): it recomputes h1 into block 3
    assert b.num_cached_tokens == 16 and b.block_ids == []
    assert s.kv.cached[h1] == 2 and s.kv._dups[h1] == [3]
    assert s.kv.free_list() == [4, 2, 3, 1]
    s.take_kv_events()
    s.add_request(Request("c", list(range(500, 520)), max_tokens=1))
    out = s.schedule()  # c takes blocks 4 and 2: block 2 is evicted, block 3 still holds h1
    assert BlockRemoved([h1]) in s.take_kv_events()  # vLLM reports the evicted block's hash all the same
    assert s.kv.cached[h1] == 3 and h1 not in s.kv._dups
    s.update_from_output(out, 0.0)
    d = Request("d", [*prompt, 99], max_tokens=1)
    s.add_request(d)
    s.schedule()
    assert d.num_cached_tokens == 32 and d.block_ids[:2] == [1, 3]
    assert s.kv.cached[h0] == 1
    assert s.kv.check_consistency() == []
