"""The seven conformance cases of spec §7 (facts from vLLM's own scheduler tests)."""

from __future__ import annotations

import pytest

from shared.core.engine import FinishReason, Request, RequestStatus
from tests.unit.engine.conftest import counts, ids, make_requests, make_scheduler, run_step


def test_small_requests_are_all_admitted_in_one_step_in_arrival_order() -> None:
    s = make_scheduler()
    reqs = make_requests(10, 10)
    for r in reqs:
        s.add_request(r)
    out = s.schedule()
    assert out.pairs() == [(f"r{i}", 10) for i in range(10)]
    assert s.num_waiting == 0
    assert ids(s.running) == [f"r{i}" for i in range(10)]


def test_long_prefill_threshold_splits_prompts_into_chunks_until_they_sample() -> None:
    s = make_scheduler(max_num_batched_tokens=1024, long_prefill_token_threshold=400)
    for r in make_requests(3, 800):
        s.add_request(r)
    assert counts(run_step(s)) == {"r0": 400, "r1": 400, "r2": 224}
    assert counts(run_step(s)) == {"r0": 400, "r1": 400, "r2": 224}
    assert counts(run_step(s)) == {"r0": 1, "r1": 1, "r2": 352}


@pytest.mark.parametrize(
    ("chunked", "expected"),
    [(True, {"r0": 800, "r1": 224}), (False, {"r0": 800})],
)
def test_chunked_prefill_decides_whether_a_long_prompt_takes_the_leftover_budget(
    chunked: bool, expected: dict[str, int]
) -> None:
    s = make_scheduler(max_num_batched_tokens=1024, max_num_seqs=3, enable_chunked_prefill=chunked)
    for r in make_requests(2, 800) + make_requests(2, 10, start=2):
        s.add_request(r)
    out = s.schedule()
    assert counts(out) == expected
    # without chunking the short prompts wait behind the long one although budget remains
    assert s.num_waiting == 4 - len(expected)


def test_a_running_request_needing_a_block_preempts_the_last_running_request() -> None:
    s = make_scheduler(num_gpu_blocks=11, max_num_batched_tokens=100)
    r0, r1 = make_requests(2, 80)
    s.add_request(r0)
    out0 = s.schedule()
    assert counts(out0) == {"r0": 80}
    assert len(r0.block_ids) == 5
    s.add_request(r1)
    out1 = s.schedule()  # r0 has nothing to compute until its output arrives: it is skipped, not a stop
    assert counts(out1) == {"r1": 80}
    assert len(r1.block_ids) == 5
    assert s.kv.num_free == 0
    s.update_from_output(out0, 0.0)  # r0 samples its first token and now needs a sixth block
    out2 = s.schedule()
    assert [r.req_id for r in out2.preempted] == ["r1"]
    assert counts(out2) == {"r0": 1}
    assert r1.status is RequestStatus.PREEMPTED and r1.num_computed_tokens == 0 and r1.block_ids == []
    assert len(r0.block_ids) == 6
    assert ids(s.waiting) == ["r1"]


@pytest.mark.parametrize(
    ("kw", "sampled", "out_tokens", "reason", "stop_reason"),
    [
        ({"eos_token_id": 99}, [10, 99, 12], [10, 99], FinishReason.STOP, None),
        ({"stop_token_ids": [42, 43]}, [10, 42, 12], [10, 42], FinishReason.STOP, 42),
        ({"max_tokens": 2}, [10, 11, 12], [10, 11], FinishReason.LENGTH, None),
        ({"eos_token_id": 99, "ignore_eos": True, "max_tokens": 3}, [99, 99, 99], [99, 99, 99],
         FinishReason.LENGTH, None),
        ({"eos_token_id": 99, "min_tokens": 2, "max_tokens": 4}, [99, 7, 99, 5], [99, 7, 99],
         FinishReason.STOP, None),
    ],
    ids=["eos_stops", "stop_token_stops_with_reason", "max_tokens_caps_length", "ignore_eos_keeps_going",
         "min_tokens_defers_eos"],
)
def test_stop_conditions_end_requests_in_the_engine_order(
    kw: dict[str, object], sampled: list[int], out_tokens: list[int], reason: FinishReason,
    stop_reason: int | None,
) -> None:
    s = make_scheduler()
    args: dict[str, object] = {"max_tokens": 10, **kw}
    req = Request("r0", [1, 2, 3], sampled_token_ids=sampled, **args)  # type: ignore[arg-type]
    s.add_request(req)
    for _ in range(10):
        run_step(s)
    assert req.status is RequestStatus.FINISHED
    assert req.output_token_ids == out_tokens
    assert req.finish_reason is reason
    assert req.stop_reason == stop_reason


def test_priority_policy_admits_the_most_important_request_first() -> None:
    s = make_scheduler(policy="priority", max_num_seqs=1)
    for i, (prio, arrival) in enumerate([(2, 1.0), (0, 2.0), (1, 3.0)]):
        s.add_request(Request(f"r{i}", [i] * 8, max_tokens=1, priority=prio, arrival_time=arrival))
    order = []
    for _ in range(6):
        order += [rid for rid, _ in run_step(s).pairs()]
    assert order == ["r1", "r2", "r0"]


def test_equal_priorities_fall_back_to_arrival_time() -> None:
    s = make_scheduler(policy="priority", max_num_seqs=1)
    for i, arrival in enumerate([3.0, 1.0, 2.0]):
        s.add_request(Request(f"r{i}", [i] * 8, max_tokens=1, priority=5, arrival_time=arrival))
    order = []
    for _ in range(6):
        order += [rid for rid, _ in run_step(s).pairs()]
    assert order == ["r1", "r2", "r0"]


def test_prefix_cache_hits_shared_blocks_and_frees_tails_before_prefixes() -> None:
    s = make_scheduler(num_gpu_blocks=11, enable_prefix_caching=True)
    shared = list(range(100, 148))
    r0 = Request("r0", [*shared, *range(7)], max_tokens=1)
    r1 = Request("r1", [*shared, *range(200, 205)], max_tokens=1)
    s.add_request(r0)
    s.schedule()
    assert r0.block_ids == [1, 2, 3, 4]
    s.add_request(r1)
    out = s.schedule()
    assert r1.block_ids == [1, 2, 3, 5]
    assert r1.num_cached_tokens == 48
    assert counts(out) == {"r1": 5}
    s.kv.free(r0)
    s.kv.free(r1)
    # vLLM v0.33: the partial (unhashed) blocks 4 and 5 go to the front, the shared prefix to the back
    # (spec §7.7's [6, 7, 8, 9, 10, 4, 5, 3, 2, 1] is the order before unhashed blocks were prepended)
    assert s.kv.free_list() == [5, 4, 6, 7, 8, 9, 10, 3, 2, 1]
