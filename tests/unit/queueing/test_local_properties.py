"""Property: whatever the sequence of puts, pulls, results and clock steps, the local broker answers every
accepted request exactly once, hands none out twice, and never holds more than ``scheduler_max_size``."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.core.queueing import ErrorCode, LocalBroker, Output, PullBudget, QueuedRequest, SchedulerParams

ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.lists(st.integers(0, 30), min_size=1, max_size=4), st.integers(-5, 400)),
    st.tuples(st.just("get"), st.integers(0, 40), st.integers(0, 5)),
    st.tuples(st.just("finish"), st.integers(0, 30), st.booleans()),
    st.tuples(st.just("tick"), st.floats(0, 20), st.just(0)),
), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=ops, max_size=st.sampled_from([-1, 1, 3, 8]), ttl=st.sampled_from([1.0, 5.0, 50.0]))
def test_every_accepted_request_is_answered_once_and_handed_out_at_most_once(
        ops: list[tuple[str, object, object]], max_size: int, ttl: float) -> None:
    b = LocalBroker(SchedulerParams(max_size=max_size, ttl_s=ttl))
    now = 0.0
    accepted: set[str] = set()
    handed: list[str] = []
    finals: dict[str, int] = {}
    dispatched: set[str] = set()

    def collect() -> None:
        for rid, outs in b.get_results(now).items():
            for o in outs:
                if o.finished:
                    finals[rid] = finals.get(rid, 0) + 1
                    if o.error_code:
                        assert o.error_code == ErrorCode.EXPIRED and rid not in dispatched

    for op, a, c in ops:
        if op == "put":
            assert isinstance(a, list) and isinstance(c, int)
            reqs = [QueuedRequest(request_id=f"r{i}", prompt_len=c, max_tokens=1, arrival_s=0.0) for i in a]
            for rid, why in b.put_requests(reqs, now):
                if why is None:
                    assert rid not in accepted or finals.get(rid)  # an id is reusable only once answered
                    accepted.add(rid)
                    finals.pop(rid, None)
                    dispatched.discard(rid)
        elif op == "get":
            assert isinstance(a, int) and isinstance(c, int)
            got = b.get_requests(PullBudget(available_blocks=a, block_size=16, reserved_output_blocks=1, batch=c),
                                 now)
            for r in got:
                assert r.request_id not in dispatched
                dispatched.add(r.request_id)
                handed.append(r.request_id)
        elif op == "finish":
            rid = f"r{a}"
            if rid in dispatched:
                b.put_results([Output(request_id=rid, seq=0, finished=bool(c))])
        else:
            assert isinstance(a, float)
            now += a
        if max_size > 0:
            assert b.held() <= max_size
        collect()
    for rid in dispatched:
        if rid not in finals:
            b.put_results([Output(request_id=rid, seq=1, finished=True)])
    now += ttl + 1
    b.expire(now)
    collect()
    assert all(n == 1 for n in finals.values())
    assert set(finals) == accepted  # nothing accepted went unanswered
    assert b.held() == 0 and b.unhandled() == 0
