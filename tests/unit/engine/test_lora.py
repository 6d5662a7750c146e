"""LoRA in the engine core: max_loras per batch, adapters loaded on demand with a load time, stats."""

from __future__ import annotations

import pytest

from shared.core.engine import Engine, Request, SchedulerConfig
from shared.core.engine.step_time import CalibratedStepTime
from tests.unit.engine.conftest import counts, ids, make_scheduler, run_step

STEP = CalibratedStepTime(base_s=0.01, per_token_s=0.0)


def lreq(rid: str, lora: str | None, n: int = 10, max_tokens: int = 3, **kw: object) -> Request:
    return Request(rid, [len(rid)] * n, max_tokens=max_tokens, lora=lora, **kw)  # type: ignore[arg-type]


def test_an_adapter_request_is_refused_when_lora_is_off() -> None:
    s = make_scheduler()
    with pytest.raises(ValueError, match="LoRA is off"):
        s.add_request(lreq("a", "sql"))


@pytest.mark.parametrize(("kw", "message"), [({"max_loras": -1}, "max_loras"),
                                              ({"max_loras": 2, "max_cpu_loras": 1}, "max_cpu_loras")])
def test_bad_lora_limits_are_refused(kw: dict[str, int], message: str) -> None:
    assert any(message in p for p in SchedulerConfig(**kw).problems())  # type: ignore[arg-type]


def test_a_request_whose_adapter_would_exceed_max_loras_waits_and_later_ones_go_ahead() -> None:
    s = make_scheduler(max_loras=1)
    for r in (lreq("a1", "a"), lreq("b1", "b"), lreq("a2", "a"), lreq("base", None)):
        s.add_request(r)
    out = s.schedule()
    assert counts(out) == {"a1": 10, "a2": 10, "base": 10}
    assert ids(s.waiting) == ["b1"]  # kept its place at the front
    assert s.lora_stats().running == ["a"] and s.lora_stats().waiting == ["b"]


def test_the_waiting_adapter_runs_once_the_running_one_is_done() -> None:
    s = make_scheduler(max_loras=1)
    for r in (lreq("a1", "a", max_tokens=2), lreq("b1", "b", max_tokens=2)):
        s.add_request(r)
    assert counts(run_step(s)) == {"a1": 10}
    assert counts(run_step(s)) == {"a1": 1}  # a1 finishes in this step
    assert s.lora_stats().running == []
    assert counts(run_step(s)) == {"b1": 10}
    assert s.lora_stats().running == ["b"]


def test_a_skipped_priority_request_keeps_its_rank() -> None:
    s = make_scheduler(max_loras=1, policy="priority")
    s.add_request(lreq("a1", "a", priority=1, arrival_time=0.0))
    s.add_request(lreq("b1", "b", priority=0, arrival_time=1.0))
    s.add_request(lreq("b2", "b", priority=2, arrival_time=2.0))
    s.add_request(lreq("c1", "c", priority=3, arrival_time=3.0))
    assert counts(s.schedule()) == {"b1": 10, "b2": 10}
    assert ids(s.waiting) == ["a1", "c1"]


def test_preempting_an_adapter_request_frees_its_adapter_slot() -> None:
    s = make_scheduler(max_loras=1, num_gpu_blocks=3, max_num_batched_tokens=100)
    s.add_request(lreq("a1", "a", n=16, max_tokens=20))
    s.add_request(lreq("a2", "a", n=8, max_tokens=20))
    run_step(s)
    out = run_step(s)  # a1 needs a second block; a2 (the last running) is preempted
    assert ids(out.preempted) == ["a2"]
    assert s.lora_running == {"a": 1}


def test_the_first_step_using_an_adapter_pays_its_load_time_and_later_ones_do_not() -> None:
    eng = Engine(SchedulerConfig(max_loras=2), STEP, fast_forward=False, lora_load_s=0.2)
    eng.add_request(lreq("a1", "a"))
    eng.add_request(lreq("b1", "b"))
    first = eng.step()
    assert sorted(first.output.lora_loads) == ["a", "b"]
    assert first.duration == pytest.approx(0.01 + 2 * 0.2)
    assert eng.step().duration == pytest.approx(0.01)
    eng.add_request(lreq("a2", "a"))
    third = eng.step()
    assert third.output.lora_loads == [] and third.duration == pytest.approx(0.01)


def test_the_least_recently_used_idle_adapter_is_unloaded_when_the_cache_is_full() -> None:
    s = make_scheduler(max_loras=1, max_cpu_loras=2)
    loads = []
    for rid, lora in (("a1", "a"), ("b1", "b"), ("c1", "c"), ("b2", "b"), ("a2", "a")):
        s.add_request(lreq(rid, lora, max_tokens=1))
        out = s.schedule()
        s.update_from_output(out, 0.0)
        loads += out.lora_loads
    assert loads == ["a", "b", "c", "a"]  # c unloaded a; b was still loaded when b2 came
    assert list(s.lora_loaded) == ["b", "a"]  # least recently admitted first


def test_only_adapters_of_requests_run_this_step_count_against_max_loras() -> None:
    # vLLM counts the adapters of the requests its running pass scheduled; a running request with nothing to
    # compute this step (its output not back yet) does not hold an adapter slot
    s = make_scheduler(max_loras=1)
    s.add_request(lreq("a1", "a"))
    s.schedule()  # a1 prefills; its sampled token has not come back
    s.add_request(lreq("b1", "b"))
    out = s.schedule()
    assert counts(out) == {"b1": 10}
    assert s.lora_stats().running == ["a", "b"]
