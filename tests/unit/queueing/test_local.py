"""The local broker, hand-driven (FastDeploy's local-scheduler scenarios plus explicit expiry)."""

from __future__ import annotations

import pytest

from shared.core.queueing import (
    ChunkedQuota,
    ErrorCode,
    LocalBroker,
    Output,
    ParamError,
    PullBudget,
    QueuedRequest,
    SchedulerParams,
    admit,
    required_blocks,
)


def req(rid: str, prompt: int = 10, max_tokens: int = 4) -> QueuedRequest:
    return QueuedRequest(request_id=rid, prompt_len=prompt, max_tokens=max_tokens, arrival_s=0.0)


BIG = PullBudget(available_blocks=1000, block_size=16, reserved_output_blocks=0, batch=100)


def test_over_max_size_the_whole_put_is_refused_with_a_clear_reason() -> None:
    b = LocalBroker(SchedulerParams(max_size=2))
    assert b.put_requests([req("a")], 0.0) == [("a", None)]
    answers = b.put_requests([req("b"), req("c")], 0.0)
    assert [rid for rid, _ in answers] == ["b", "c"]
    assert all(why is not None and "Exceeding the max length" in why and "scheduler_max_size=2" in why
               for _, why in answers)
    assert b.unhandled() == 1 and b.rejected_total == 2


def test_dispatched_unfinished_requests_count_against_max_size() -> None:
    b = LocalBroker(SchedulerParams(max_size=1))
    b.put_requests([req("a")], 0.0)
    assert [r.request_id for r in b.get_requests(BIG, 0.0)] == ["a"]
    assert b.put_requests([req("b")], 0.0)[0][1] is not None
    b.put_results([Output(request_id="a", seq=0, num_tokens=1, finished=True)])
    b.get_results(0.0)
    assert b.put_requests([req("b")], 0.0) == [("b", None)]


def test_a_duplicate_id_is_refused_also_within_one_put() -> None:
    b = LocalBroker()
    assert b.put_requests([req("a"), req("a")], 0.0) == [("a", None), ("a", "duplicated request_id")]
    assert b.put_requests([req("a")], 1.0) == [("a", "duplicated request_id")]


@pytest.mark.parametrize("bad", [req(""), req("x", prompt=-1), req("x", max_tokens=0), req("y" * 300)])
def test_malformed_requests_are_refused_in_the_answer(bad: QueuedRequest) -> None:
    [(_, why)] = LocalBroker().put_requests([bad], 0.0)
    assert why is not None and why.startswith("invalid request")


def test_an_expired_request_gets_an_explicit_expiry_answer() -> None:
    b2 = LocalBroker(SchedulerParams(ttl_s=10), node="n1")
    b2.put_requests([req("old")], 0.0)
    b2.put_requests([req("new")], 5.0)
    assert [r.request_id for r in b2.get_requests(BIG, 10.0)] == ["new"]
    res = b2.get_results(10.0)
    [answer] = res["old"]
    assert answer.finished and answer.error_code == ErrorCode.EXPIRED and "scheduler_ttl is 10 s" in answer.error
    assert not b2.has_request("old") and b2.expired_total == 1


def test_expiry_happens_without_a_pull_and_frees_room() -> None:
    b = LocalBroker(SchedulerParams(ttl_s=1, max_size=1))
    b.put_requests([req("a")], 0.0)
    assert b.put_requests([req("b")], 2.0) == [("b", None)]  # "a" expired at put time, "b" fits
    assert b.get_results(2.0)["a"][0].error_code == ErrorCode.EXPIRED


def test_ttl_counts_from_acceptance_not_from_a_client_supplied_time() -> None:
    b = LocalBroker(SchedulerParams(ttl_s=10))
    forged = QueuedRequest(request_id="f", prompt_len=1, max_tokens=1, arrival_s=-1e9)
    b.put_requests([forged], 100.0)
    assert [r.request_id for r in b.get_requests(BIG, 105.0)] == ["f"]


def test_a_dispatched_request_is_not_expired_by_the_broker() -> None:
    b = LocalBroker(SchedulerParams(ttl_s=1))
    b.put_requests([req("a")], 0.0)
    b.get_requests(BIG, 0.5)
    assert b.expire(100.0) == [] and b.has_request("a")


@pytest.mark.parametrize(("prompt", "block", "blocks"), [(100, 25, 4), (101, 25, 5), (0, 25, 0), (17, 4, 5)])
def test_required_blocks(prompt: int, block: int, blocks: int) -> None:
    assert required_blocks(prompt, block) == blocks


def test_nothing_is_handed_out_when_free_blocks_do_not_exceed_the_reserve() -> None:
    b = LocalBroker()
    b.put_requests([req("a")], 0.0)
    assert b.get_requests(PullBudget(available_blocks=5, block_size=16, reserved_output_blocks=10, batch=4), 0) == []


def test_nothing_is_handed_out_for_batch_zero() -> None:
    b = LocalBroker()
    b.put_requests([req("a")], 0.0)
    assert b.get_requests(PullBudget(available_blocks=100, block_size=16, batch=0), 0.0) == []


def test_unhandled_counts_queued_not_dispatched() -> None:
    b = LocalBroker()
    b.put_requests([req("a"), req("b"), req("c")], 0.0)
    b.get_requests(PullBudget(available_blocks=100, block_size=16, batch=2), 0.0)
    assert b.unhandled() == 1 and b.held() == 3


def test_just_inside_the_ttl_a_request_is_still_served() -> None:
    b = LocalBroker(SchedulerParams(ttl_s=10))
    b.put_requests([req("a")], 0.0)
    assert [r.request_id for r in b.get_requests(BIG, 9.999)] == ["a"]


def test_a_result_for_an_unknown_id_is_dropped() -> None:
    b = LocalBroker()
    assert b.put_results([Output(request_id="ghost", seq=0)]) == ["ghost"]
    assert b.get_results(0.0) == {}


def test_after_a_reset_a_late_output_of_the_previous_run_is_dropped() -> None:
    b = LocalBroker()
    b.put_requests([req("a")], 0.0)
    assert [r.request_id for r in b.get_requests(BIG, 0.0)] == ["a"]
    b.reset()  # the engine restarted: what it was running is gone
    assert b.put_results([Output(request_id="a", seq=0)]) == ["a"]
    assert b.get_results(0.0) == {} and not b.has_request("a")


def test_admission_stops_at_the_first_request_that_does_not_fit_in_blocks() -> None:
    b = LocalBroker()
    b.put_requests([req("a", 32), req("b", 64), req("c", 1)], 0.0)  # 2+1, 4+1 blocks, 1+1
    got = b.get_requests(PullBudget(available_blocks=7, block_size=16, reserved_output_blocks=1, batch=3), 0.0)
    assert [r.request_id for r in got] == ["a"]  # "c" would fit but does not jump the queue
    assert b.unhandled() == 2


def test_token_cap_lets_the_first_request_through_alone() -> None:
    q = [req("a", 5000), req("b", 5000)]
    assert admit(q, PullBudget(available_blocks=10**6, block_size=16, max_num_batched_tokens=4096, batch=2)) == 1


def test_chunked_quota_limits_long_prefills_per_pull() -> None:
    q = [req("long1", 12), req("long2", 10)]
    quota = ChunkedQuota(long_prefill_token_threshold=5, max_num_partial_prefills=4, max_long_partial_prefills=1)
    assert admit(q, PullBudget(available_blocks=100, block_size=4, reserved_output_blocks=0, batch=2,
                               chunked=quota)) == 1


def test_chunked_quota_with_no_long_slot_takes_only_the_short_one() -> None:
    q = [req("short", 2), req("long", 10)]
    quota = ChunkedQuota(long_prefill_token_threshold=4, max_num_partial_prefills=2, max_long_partial_prefills=0)
    assert admit(q, PullBudget(available_blocks=100, block_size=4, reserved_output_blocks=0, batch=2,
                               chunked=quota)) == 1


def test_a_malformed_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="block_size"):
        admit([req("a")], PullBudget(available_blocks=10, block_size=0))


def test_a_finished_requests_later_output_is_dropped() -> None:
    b = LocalBroker()
    b.put_requests([req("a")], 0.0)
    b.get_requests(BIG, 0.0)
    b.put_results([Output(request_id="a", seq=0, finished=True)])
    assert list(b.get_results(0.0)) == ["a"]
    assert b.put_results([Output(request_id="a", seq=1, finished=True)]) == ["a"]


def test_fifo_order_is_kept_across_pulls() -> None:
    b = LocalBroker()
    b.put_requests([req(str(i)) for i in range(5)], 0.0)
    one = PullBudget(available_blocks=100, block_size=16, batch=2)
    assert [r.request_id for r in b.get_requests(one, 0)] + [r.request_id for r in b.get_requests(one, 0)] == [
        "0", "1", "2", "3"]


def test_a_bad_config_is_refused_at_construction() -> None:
    with pytest.raises(ParamError):
        LocalBroker(SchedulerParams(max_size=0))


def test_released_requests_leave_the_queue_and_free_room() -> None:
    b = LocalBroker(SchedulerParams(max_size=2))
    b.put_requests([req("a"), req("b")], 0.0)
    assert [r.request_id for r in b.head(5)] == ["a", "b"]
    assert [r.request_id for r in b.release(1)] == ["a"]
    assert b.held() == 1 and not b.has_request("a")
    assert b.put_requests([req("c")], 0.0) == [("c", None)]


def test_adopted_requests_keep_their_arrival_and_ignore_the_bound() -> None:
    b = LocalBroker(SchedulerParams(max_size=1, ttl_s=10))
    b.put_requests([req("mine")], 5.0)
    old = QueuedRequest(request_id="rescued", prompt_len=1, max_tokens=1, arrival_s=1.0)
    assert b.adopt([old, old]) == 1 and b.held() == 2
    b.get_requests(PullBudget(available_blocks=0, block_size=16), 11.0)
    assert b.get_results(11.0)["rescued"][0].error_code == ErrorCode.EXPIRED


def test_plan_pull_takes_expired_requests_along_and_stops_at_the_first_that_does_not_fit() -> None:
    from shared.core.queueing.admission import plan_pull

    old = QueuedRequest(request_id="old", prompt_len=10_000, max_tokens=1, arrival_s=0.0)
    fits = QueuedRequest(request_id="fits", prompt_len=16, max_tokens=1, arrival_s=50.0)
    big = QueuedRequest(request_id="big", prompt_len=10_000, max_tokens=1, arrival_s=50.0)
    budget = PullBudget(available_blocks=10, block_size=16, reserved_output_blocks=0, batch=8)
    plan = plan_pull([old, None, fits, big, fits], budget, now=60.0, ttl_s=30.0)
    assert (plan.count, plan.expired, plan.missing) == (3, (0,), (1,))


def test_plan_pull_takes_a_queue_of_only_expired_requests_whole() -> None:
    from shared.core.queueing.admission import plan_pull

    olds = [QueuedRequest(request_id=str(i), prompt_len=10**6, max_tokens=1, arrival_s=0.0) for i in range(3)]
    plan = plan_pull(olds, PullBudget(available_blocks=10, block_size=16, batch=3), now=100.0, ttl_s=1.0)
    assert (plan.count, plan.expired) == (3, (0, 1, 2))


# -- found by an adversarial review -------------------------------------------------------------------------------

def test_a_chunk_delivered_again_reaches_the_client_once() -> None:
    b = LocalBroker(SchedulerParams(ttl_s=10))
    b.put_requests([req("a")], 0.0)
    b.get_requests(BIG, 0.0)
    final = Output(request_id="a", seq=0, finished=True)
    assert b.put_results([final]) == [] and b.put_results([final]) == ["a"]  # a retried delivery
    assert [o.seq for o in b.get_results(1.0)["a"]] == [0]


def test_an_id_answered_within_the_ttl_is_refused_as_a_duplicate_not_served_again() -> None:
    b = LocalBroker(SchedulerParams(ttl_s=10))
    b.put_requests([req("a")], 0.0)
    b.get_requests(BIG, 0.0)
    b.put_results([Output(request_id="a", seq=0, finished=True)])
    b.get_results(1.0)
    assert b.put_requests([req("a")], 2.0) == [("a", "duplicated request_id")]
    assert b.put_requests([req("a")], 12.0) == [("a", None)]  # past the TTL the id is free again


def test_an_output_for_a_request_still_queued_is_dropped_and_the_broker_goes_on() -> None:
    # accepted, it made the broker forget a queued request, and every later call raised KeyError
    b = LocalBroker(SchedulerParams(ttl_s=10))
    b.put_requests([req("a"), req("b")], 0.0)
    assert b.put_results([Output(request_id="a", seq=0, finished=True)]) == ["a"]  # a late output of an older run
    assert b.get_results(1.0) == {}
    assert b.get_requests(PullBudget(available_blocks=0, block_size=4), 20.0) == []  # both expire, answered
    answered = b.get_results(20.0)
    assert sorted(answered) == ["a", "b"] and all(v[0].error_code == ErrorCode.EXPIRED for v in answered.values())


def test_a_request_no_engine_of_this_size_can_hold_is_taken_to_be_refused_not_left_at_the_head() -> None:
    small = PullBudget(available_blocks=10, block_size=16, reserved_output_blocks=0, batch=4, total_blocks=10)
    assert admit([req("huge", prompt=10_000), req("ok")], small) == 1
    assert admit([req("huge", prompt=10_000)], PullBudget(available_blocks=10, block_size=16, batch=4)) == 0
