"""Property tests for LoRA, P/D roles, KV events and aborts together: no leak, no stuck request, and the
KV events always describe exactly what the prefix cache holds."""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.core.engine import Request, RequestStatus, Scheduler, SchedulerConfig
from shared.core.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from shared.core.roles import NodeRole


@st.composite
def workloads(draw: st.DrawFn) -> tuple[SchedulerConfig, float, list[dict[str, Any]]]:
    bs = draw(st.sampled_from([2, 4, 16]))
    role = draw(st.sampled_from(list(NodeRole)))
    reqs: list[dict[str, Any]] = []
    for i in range(draw(st.integers(1, 20))):
        plen = draw(st.integers(1, 80))
        family = draw(st.integers(0, 2))
        reqs.append({
            "id": f"r{i}",
            "prompt": [family] * (plen // 2) + [1000 + i] * (plen - plen // 2),
            "max_tokens": draw(st.integers(1, 25)),
            "priority": draw(st.integers(0, 3)),
            "arrival_step": draw(st.integers(0, 25)),
            "lora": draw(st.sampled_from([None, "a", "b", "c"])),
            "remote": role is not NodeRole.PREFILL and draw(st.booleans()),
            "abort_step": draw(st.one_of(st.none(), st.integers(0, 60))),
        })
    need = max(-(-(len(r["prompt"]) + r["max_tokens"]) // bs) for r in reqs)
    cfg = SchedulerConfig(
        block_size=bs,
        num_gpu_blocks=need + 1 + draw(st.integers(0, 3 * need)),
        max_num_seqs=draw(st.integers(1, 6)),
        max_num_batched_tokens=draw(st.integers(8, 128)),
        enable_prefix_caching=draw(st.booleans()),
        policy=draw(st.sampled_from(["fcfs", "priority"])),
        long_prefill_token_threshold=draw(st.sampled_from([0, 8, 32])),
        enable_kv_events=True,
        max_loras=draw(st.integers(1, 3)),
        max_cpu_loras=None,
        role=role,
    )
    return cfg, draw(st.sampled_from([0.0, 0.5, 3.0])), reqs


def _apply(held: Counter[int], events: list[KVEvent]) -> None:
    for e in events:
        if isinstance(e, BlockStored):
            held.update(e.block_hashes)
        elif isinstance(e, BlockRemoved):
            for h in e.block_hashes:
                assert held[h] > 0, "removal of a hash the cache never reported"
                held[h] -= 1
        elif isinstance(e, AllBlocksCleared):
            held.clear()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_lora_pd_events_and_aborts_leave_a_clean_pool_and_a_truthful_event_stream(
    w: tuple[SchedulerConfig, float, list[dict[str, Any]]],
) -> None:
    cfg, transfer_s, specs = w
    s = Scheduler(cfg)
    s.kv_transfer_time = lambda n: transfer_s
    held: Counter[int] = Counter()
    reqs: dict[str, Request] = {}
    step = 0
    while step < 3000:
        now = float(step)
        for spec in specs:
            if spec["arrival_step"] == step:
                r = Request(spec["id"], spec["prompt"], max_tokens=spec["max_tokens"], priority=spec["priority"],
                            arrival_time=now, lora=spec["lora"], remote_prefill=spec["remote"])
                reqs[r.req_id] = r
                s.add_request(r)
            if spec["abort_step"] == step and spec["id"] in reqs:
                s.abort(reqs[spec["id"]], now)
        if not s.has_work() and len(reqs) == len(specs) and not s.sending:
            break
        out = s.schedule(now)
        assert out.num_tokens <= cfg.max_num_batched_tokens
        assert len(s.running) <= cfg.max_num_seqs
        assert len(s.lora_running) <= cfg.max_loras
        s.update_from_output(out, now + 0.5)
        _apply(held, s.take_kv_events())
        assert s.kv.check_consistency() == []
        hashed = Counter(h for h in s.kv.block_hash if h is not None)
        assert +held == hashed, "the events describe exactly the hashes the pool holds"
        step += 1
    assert all(r.status is RequestStatus.FINISHED for r in reqs.values()), "every request ends"
    assert s.kv.num_free == cfg.num_gpu_blocks - 1 and not s.remote_wait and not s.sending, "no block leaks"
    assert s.lora_running == {}
    if cfg.role is NodeRole.PREFILL:
        assert all(r.num_output_tokens <= 1 for r in reqs.values())
