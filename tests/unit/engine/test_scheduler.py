"""Scheduler behaviours beyond the conformance cases: priority victims, aborts, length limits, caching."""

from __future__ import annotations

import pytest

from shared.core.engine import FinishReason, Request, RequestStatus, SchedulerConfig
from tests.unit.engine.conftest import counts, make_scheduler, run_step


def test_priority_preemption_takes_back_a_victim_already_scheduled_this_step() -> None:
    s = make_scheduler(policy="priority", num_gpu_blocks=12, max_num_batched_tokens=256)
    low = Request("low", [7] * 80, max_tokens=30, priority=5, arrival_time=0.0)
    high = Request("high", [8] * 80, max_tokens=30, priority=1, arrival_time=1.0)
    s.add_request(low)
    run_step(s)
    s.add_request(high)
    run_step(s)
    assert s.kv.num_free == 0
    out = run_step(s)
    assert [r.req_id for r in out.preempted] == ["low"]
    assert counts(out) == {"high": 1}  # low's token was given back to the budget
    assert out.num_tokens == 1
    assert low.status is RequestStatus.PREEMPTED and low.block_ids == []


def test_a_preempted_request_recomputes_prompt_and_outputs_and_keeps_its_tokens() -> None:
    s = make_scheduler(num_gpu_blocks=11, max_num_batched_tokens=100)
    r0, r1 = (Request(f"r{i}", [i] * 80, max_tokens=20) for i in range(2))
    s.add_request(r0)
    s.add_request(r1)
    for _ in range(200):
        if not s.has_work():
            break
        run_step(s)
    assert r1.num_preemptions == 1
    assert r0.num_output_tokens == r1.num_output_tokens == 20
    assert s.kv.num_free == 10 and s.kv.check_consistency() == []


def test_max_model_len_caps_the_output_as_length() -> None:
    s = make_scheduler(max_model_len=20)
    r = Request("r", [1] * 15, max_tokens=100)
    s.add_request(r)
    while s.has_work():
        run_step(s)
    assert r.num_output_tokens == 5 and r.finish_reason is FinishReason.LENGTH


def test_a_prompt_longer_than_max_model_len_is_refused() -> None:
    s = make_scheduler(max_model_len=20)
    with pytest.raises(ValueError, match="max_model_len"):
        s.add_request(Request("r", [1] * 20, max_tokens=1))


def test_abort_frees_blocks_of_running_and_waiting_requests() -> None:
    s = make_scheduler(max_num_seqs=1)
    a, b = Request("a", [1] * 40, max_tokens=50), Request("b", [2] * 40, max_tokens=50)
    s.add_request(a)
    s.add_request(b)
    run_step(s)
    s.abort(a, 1.0)
    s.abort(b, 1.0)
    assert not s.has_work()
    assert a.finish_reason is FinishReason.ABORT and b.finish_reason is FinishReason.ABORT
    assert s.kv.num_free == s.config.num_gpu_blocks - 1
    assert s.counters.finished_by_reason == {"abort": 2}


def test_blocks_are_cached_as_soon_as_they_are_full_so_a_later_request_in_the_same_step_hits() -> None:
    s = make_scheduler(enable_prefix_caching=True)
    shared = list(range(64))
    a, b = Request("a", [*shared, 1], max_tokens=2), Request("b", [*shared, 2], max_tokens=2)
    s.add_request(a)
    s.add_request(b)
    out = s.schedule()
    assert counts(out) == {"a": 65, "b": 1}
    assert b.num_cached_tokens == 64 and b.block_ids[:4] == a.block_ids[:4]


def test_evicted_cache_blocks_stop_hitting() -> None:
    s = make_scheduler(enable_prefix_caching=True, num_gpu_blocks=6)
    a = Request("a", list(range(33)), max_tokens=1)
    s.add_request(a)
    run_step(s)  # a finishes; its 3 blocks are free but still cached
    assert len(s.kv.cached) == 2
    filler = Request("f", [9] * 70, max_tokens=1)  # takes all 5 blocks: evicts a's cached blocks
    s.add_request(filler)
    run_step(s)
    again = Request("again", list(range(33)), max_tokens=1)
    s.add_request(again)
    run_step(s)
    assert again.num_cached_tokens == 0


def test_config_problems_are_listed_not_raised_late() -> None:
    cfg = SchedulerConfig(block_size=0, num_gpu_blocks=1, policy="lifo")  # type: ignore[arg-type]
    assert len(cfg.problems()) == 3
    with pytest.raises(ValueError, match="block_size"):
        make_scheduler(block_size=0)


def test_step_aggregates_count_attention_and_kv_reads_per_chunk() -> None:
    s = make_scheduler(max_num_batched_tokens=100)
    a, b = Request("a", [1] * 10, max_tokens=5), Request("b", [2] * 300, max_tokens=5)
    s.add_request(a)
    s.add_request(b)
    out = s.schedule()  # a: q=10 on c=0; b: q=90 on c=0
    assert (out.attn_work, out.kv_read) == (10 * 11 // 2 + 90 * 91 // 2, 10 + 90)
    s.update_from_output(out, 0.0)
    out = s.schedule()  # a decodes (q=1, c=10); b: q=99 on c=90
    assert (out.attn_work, out.kv_read) == ((10 + 1) + (99 * 90 + 99 * 100 // 2), 11 + 189)
