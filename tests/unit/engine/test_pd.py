"""Prefill/decode disaggregation in the engine core: prefill-only engines, decode engines waiting for remote KV."""

from __future__ import annotations

import pytest

from shared.core.engine import Engine, FinishReason, KVLink, Request, RequestStatus, SchedulerConfig
from shared.core.engine.step_time import CalibratedStepTime
from shared.core.roles import NodeRole
from tests.unit.engine.conftest import counts, make_scheduler, run_step

STEP = CalibratedStepTime(base_s=0.01, per_token_s=0.0)
KV_PER_TOKEN = 131_072  # Llama-3-8B, bf16
LINK = KVLink(bandwidth_bytes_s=50e9, latency_s=1e-3)


def engine(role: NodeRole, **cfg: object) -> Engine:
    config = SchedulerConfig(role=role, **cfg)  # type: ignore[arg-type]
    return Engine(config, STEP, fast_forward=False, kv_link=LINK, kv_bytes_per_token=KV_PER_TOKEN)


def test_transfer_time_is_bytes_over_bandwidth_plus_latency() -> None:
    assert LINK.transfer_s(1000 * KV_PER_TOKEN) == pytest.approx(1e-3 + 1000 * KV_PER_TOKEN / 50e9)
    assert LINK.transfer_s(0) == 0.0


@pytest.mark.parametrize(("bw", "lat"), [(0.0, 0.0), (-1.0, 0.0), (1e9, -1.0)])
def test_a_bad_link_is_refused(bw: float, lat: float) -> None:
    with pytest.raises(ValueError):
        KVLink(bandwidth_bytes_s=bw, latency_s=lat)


def test_a_prefill_engine_finishes_a_request_after_its_first_token_and_hands_off_its_kv() -> None:
    eng = engine(NodeRole.PREFILL)
    r = Request("p", list(range(100)), max_tokens=50, sampled_token_ids=[7, 8])
    eng.add_request(r)
    res = eng.step()
    assert res.finished == [r]
    assert r.finish_reason is FinishReason.LENGTH and r.num_output_tokens == 1
    h = r.kv_handoff
    assert h is not None
    assert (h.req_id, h.num_tokens, h.num_bytes, h.first_token) == ("p", 100, 100 * KV_PER_TOKEN, 7)
    assert h.ready_at == res.start + res.duration


def test_a_prefill_engine_keeps_the_blocks_until_the_kv_has_been_sent() -> None:
    eng = engine(NodeRole.PREFILL)
    r = Request("p", list(range(100)), max_tokens=5)
    eng.add_request(r)
    eng.step()
    s = eng.scheduler
    assert s.kv.num_used == 7  # 100 prompt tokens + the sampled one, blocks of 16
    release = r.finish_time + LINK.transfer_s(100 * KV_PER_TOKEN)
    assert s.next_wakeup() == pytest.approx(release)
    s.schedule(release - 1e-6)
    assert s.kv.num_used == 7
    s.schedule(release)
    assert s.kv.num_used == 0 and s.next_wakeup() is None
    assert (s.counters.kv_transfers_out, s.counters.kv_bytes_out) == (1, 100 * KV_PER_TOKEN)


def test_a_prefill_engine_refuses_a_request_that_expects_remote_kv() -> None:
    s = make_scheduler(role=NodeRole.PREFILL)
    with pytest.raises(ValueError, match="prefill-only"):
        s.add_request(Request("d", [1] * 10, max_tokens=3, remote_prefill=True))


def test_a_decode_engine_parks_a_remote_request_with_its_blocks_until_the_kv_arrives() -> None:
    s = make_scheduler(role=NodeRole.DECODE)
    s.kv_transfer_time = lambda n: 0.5
    r = Request("d", [1] * 40, max_tokens=3, remote_prefill=True)
    s.add_request(r)
    out = s.schedule(0.0)
    assert counts(out) == {}
    assert r.status is RequestStatus.WAITING_FOR_REMOTE_KVS and r.kv_ready_at == 0.5
    assert len(r.block_ids) == 3 and s.running == [] and s.num_waiting == 1
    assert counts(s.schedule(0.4)) == {}
    out = s.schedule(0.5)
    assert counts(out) == {"d": 1}  # only the last prompt token is computed, and it samples
    assert out.sampling == [r] and r.status.name == "RUNNING"


def test_requests_waiting_for_kv_do_not_take_running_slots() -> None:
    s = make_scheduler(role=NodeRole.DECODE, max_num_seqs=1)
    s.kv_transfer_time = lambda n: 1.0
    a, b = (Request(i, [2] * 20, max_tokens=2, remote_prefill=True) for i in ("a", "b"))
    s.add_request(a)
    s.add_request(b)
    s.schedule(0.0)
    assert a.status is b.status is RequestStatus.WAITING_FOR_REMOTE_KVS
    out = s.schedule(1.0)
    assert counts(out) == {"a": 1} and b.status.name == "WAITING"


def test_local_prefix_hits_on_the_decode_side_are_not_transferred() -> None:
    s = make_scheduler(role=NodeRole.DECODE, enable_prefix_caching=True)
    s.kv_bytes_per_token = 10
    s.kv_transfer_time = lambda n: n * 0.001
    prompt = list(range(64))
    s.add_request(Request("local", prompt, max_tokens=1))
    run_step(s)  # caches 4 blocks locally
    r = Request("d", [*prompt, *range(100, 120)], max_tokens=2, remote_prefill=True)
    s.add_request(r)
    s.schedule(10.0)
    assert r.num_cached_tokens == 64
    assert r.kv_ready_at == pytest.approx(10.0 + 20 * 0.001)
    assert s.counters.kv_bytes_in == 200


def test_aborting_a_request_waiting_for_kv_frees_its_blocks() -> None:
    s = make_scheduler(role=NodeRole.DECODE)
    s.kv_transfer_time = lambda n: 1.0
    r = Request("d", [1] * 40, max_tokens=3, remote_prefill=True)
    s.add_request(r)
    s.schedule(0.0)
    s.abort(r, 0.1)
    assert s.kv.num_used == 0 and not s.has_work() and r.finish_reason is FinishReason.ABORT


def test_a_decode_request_preempted_after_its_kv_arrived_recomputes_locally() -> None:
    s = make_scheduler(role=NodeRole.DECODE, num_gpu_blocks=4, max_num_batched_tokens=100)
    s.kv_transfer_time = lambda n: 0.0
    a = Request("a", [1] * 32, max_tokens=30, remote_prefill=True)
    b = Request("b", [2] * 16, max_tokens=30, arrival_time=1.0)
    s.add_request(a)
    s.schedule(0.0)  # a parks (2 blocks), its KV is there at once
    s.add_request(b)
    for _ in range(40):
        out = run_step(s, 0.0)
        if out.preempted:
            break
    assert [r.req_id for r in out.preempted] == ["b"]
    assert b.kv_pending is False and a.kv_pending is False


def test_virtual_time_jumps_to_the_kv_arrival_and_ttft_includes_the_transfer() -> None:
    pre = engine(NodeRole.PREFILL)
    dec = engine(NodeRole.DECODE)
    prompt = list(range(1000))
    pre.add_request(Request("x", prompt, max_tokens=1))
    done: list[Request] = []
    pre.run_until(1e9, done)
    h = done[0].kv_handoff
    assert h is not None
    r = Request("x", prompt, max_tokens=4, remote_prefill=True, arrival_time=h.ready_at)
    dec.add_request(r)
    dec.run_until(1e9)
    transfer = LINK.transfer_s(1000 * KV_PER_TOKEN)
    assert r.finish_reason is FinishReason.LENGTH and r.num_output_tokens == 4
    assert r.ttft == pytest.approx(transfer + 0.01)  # the transfer, then one step computing the last prompt token
    assert dec.scheduler.counters.kv_transfers_in == 1
