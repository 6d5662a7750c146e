"""A bookkeeping value in Redis that is not what its reader expects (written past the state layer, by hand or an
older build) is read as "long ago" or left out: it never raises, so it can neither stop the reconciler's periodic
checks (every tick read all of them) nor stop a snapshot loading, and an infinite time never keeps a worker alive."""

from __future__ import annotations

import msgspec
import pytest

from shared.core.limits import MAX_REPLICAS
from shared.core.placement.domain import GIB, Gpu, Instance, InstanceState, Worker
from shared.state import StateStore

W0 = Worker(name="w0", gpus=(Gpu(index=0, vram_total=80 * GIB),), ram_total=512 * GIB)
BAD_TIMES = [b"soon", b"nan", b"inf", b"-inf", b"-5", b""]


@pytest.mark.parametrize("raw", BAD_TIMES)
async def test_a_last_seen_time_that_is_not_a_finite_time_reads_as_long_ago(store: StateStore, raw: bytes) -> None:
    await store.register_workers([W0], 100.0)
    await store.r.hset("gantry:seen", "w0", raw)
    [w] = await store.workers()
    assert w.last_heartbeat == 0.0


@pytest.mark.parametrize("raw", BAD_TIMES)
async def test_a_drain_start_that_is_not_a_finite_time_reads_as_long_ago(store: StateStore, raw: bytes) -> None:
    await store.mark_drains(["good"], 50.0)
    await store.r.hset("gantry:drains", "bad", raw)
    assert await store.drains() == {"good": 50.0, "bad": 0.0}


@pytest.mark.parametrize("raw", [b"not json", b"[]", b"7", b'{"since": "x"}', b'{"since": NaN}', b'{"message": 1}',
                                 b'{"since": 1e999}'])
async def test_a_failure_record_that_is_not_one_reads_as_failed_long_ago(store: StateStore, raw: bytes) -> None:
    await store.record_failures({"good": (10.0, "oom")})
    await store.r.hset("gantry:failures", "bad", raw)
    got = await store.failures()
    assert got["good"] == (10.0, "oom")
    assert got["bad"][0] == 0.0


@pytest.mark.parametrize("raw", [b"{", b'{"count": -1, "last_at": 1}', b'{"count": "2", "last_at": 1}', b'"x"',
                                 b'{"last_at": 1}'])
async def test_a_restart_record_that_is_not_one_is_left_out(store: StateStore, raw: bytes) -> None:
    await store.set_restarts({"good": (2, 30.0)})
    await store.r.hset("gantry:restarts", "bad", raw)
    assert await store.restarts() == {"good": (2, 30.0)}


@pytest.mark.parametrize("raw", [b"[", b"[1, 2]", b'["a", 1, null]', b"[-1, 1, null]", b'{"a": 1}', b"null"])
async def test_a_retry_record_that_is_not_one_is_left_out(store: StateStore, raw: bytes) -> None:
    await store.set_retries({"good": (1, 20.0, float("-inf"))})
    await store.r.hset("gantry:retries", "bad", raw)
    assert await store.retries() == {"good": (1, 20.0, float("-inf"))}
    assert await store.retries(["bad", "good"]) == {"good": (1, 20.0, float("-inf"))}


async def test_a_retry_record_with_a_time_that_is_not_one_reads_it_as_long_ago(store: StateStore) -> None:
    await store.r.hset("gantry:retries", "r", b'[1, "later", -3]')
    assert await store.retries() == {"r": (1, 0.0, 0.0)}


async def test_an_instance_whose_stored_state_is_none_is_left_out_by_every_reader(store: StateStore) -> None:
    for iid, state in (("good", "RUNNING"), ("bad", "EXPLODED")):
        await store.r.hset("gantry:inst", iid, msgspec.json.encode(Instance(id=iid, model="m")))
        await store.r.hset("gantry:inst:state", iid, state)
    assert [i.id for i in await store.instances()] == ["good"]
    assert await store.states(["good", "bad"]) == {"good": InstanceState.RUNNING}
    assert await store.instance("bad") is None


async def test_a_desired_count_that_is_no_count_is_left_out_and_a_negative_one_reads_as_zero(store: StateStore) -> None:
    counts = {"a": b"7", "b": b"-3", "c": "²".encode(), "d": b"--5", "e": b"many", "f": b"99999999"}
    await store.r.hset("gantry:desired", mapping=counts)  # type: ignore[arg-type]
    assert await store.desired() == {"a": 7, "b": 0, "f": MAX_REPLICAS}


async def test_a_desired_count_of_more_digits_than_int_converts_reads_as_the_most_replicas(store: StateStore) -> None:
    # Python refuses to convert text of more than 4,300 digits: that raised out of every reader of the counts.
    await store.r.hset("gantry:desired", mapping={"huge": b"9" * 5000, "padded": b"0" * 5000 + b"7"})
    assert await store.desired() == {"huge": MAX_REPLICAS, "padded": 7}


W1 = Worker(name="w1", gpus=(Gpu(index=0, vram_total=80 * GIB), Gpu(index=1, vram_total=80 * GIB)), ram_total=GIB)
PAST_LIMIT = b'{"name": "w1", "gpus": [{"index": 5000, "vram_total": 1}]}'  # GPU index past MAX_GPU_INDEX


async def test_a_worker_record_outside_todays_limits_is_left_out_and_named_with_why(store: StateStore) -> None:
    await store.register_workers([W0, W1], 100.0)
    await store.r.hset("gantry:workers", "w1", PAST_LIMIT)  # written by an older build, or by hand
    workers, invalid = await store.worker_records()
    assert [w.name for w in workers] == ["w0"] == [w.name for w in await store.workers()]
    assert list(invalid) == ["w1"] and "$.gpus[0].index" in invalid["w1"]
    assert await store.invalid_workers(["w0", "w1", "absent"]) == invalid


async def test_a_worker_record_outside_todays_limits_is_forgotten_with_its_ledger_capacity(store: StateStore) -> None:
    await store.register_workers([W0, W1], 100.0)
    await store.r.hset("gantry:workers", "w1", PAST_LIMIT)
    assert await store.forget_worker("w1", cutoff=None) == "ok"
    assert await store.worker_names() == {"w0"}
    assert sorted(await store.ledger()) == ["w0:0"]  # w1's two GPUs left the ledger with it


async def test_an_invalid_worker_record_with_claims_on_its_gpus_is_not_forgotten(store: StateStore) -> None:
    await store.register_workers([W1], 100.0)
    await store.r.hset("gantry:gpu:used", "w1:1", 5)  # a replica still holds VRAM there
    await store.r.hset("gantry:workers", "w1", b"{not json")
    assert await store.forget_worker("w1", cutoff=None) == "holds"
    assert await store.worker_names() == {"w1"}
