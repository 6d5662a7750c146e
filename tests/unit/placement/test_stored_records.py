"""A stored worker record is judged against today's limits in one line, and each invalid one is reported once (the
pure part of making a worker that every snapshot leaves out visible)."""

from __future__ import annotations

import msgspec

from shared.core.limits import MAX_GPU_INDEX
from shared.core.placement.domain import GIB, Gpu, Worker
from shared.core.placement.records import REASON_CHARS, invalid_reports, one_line, read_worker

W1 = Worker(name="w1", gpus=(Gpu(index=0, vram_total=80 * GIB), Gpu(index=1, vram_total=80 * GIB)))


def record(**changes: object) -> bytes:
    data = msgspec.to_builtins(W1)
    data.update(changes)
    return msgspec.json.encode(data)


def test_a_valid_record_reads_as_its_worker() -> None:
    assert read_worker("w1", msgspec.json.encode(W1)) == W1


def test_a_record_past_a_limit_reads_as_the_limit_it_breaks_and_where() -> None:
    why = read_worker("w1", record(gpus=[{"index": MAX_GPU_INDEX + 1, "vram_total": GIB}]))
    assert isinstance(why, str)
    assert f"<= {MAX_GPU_INDEX}" in why and "$.gpus[0].index" in why


def test_a_record_that_is_not_json_reads_as_why() -> None:
    why = read_worker("w1", b"{not json")
    assert isinstance(why, str) and why


def test_a_record_naming_another_worker_than_its_key_is_invalid() -> None:
    assert read_worker("w2", msgspec.json.encode(W1)) == "the record names worker 'w1', stored under 'w2'"


def test_a_record_with_one_gpu_index_twice_is_invalid() -> None:
    twice = record(gpus=[{"index": 3, "vram_total": GIB}, {"index": 3, "vram_total": GIB}])
    assert read_worker("w1", twice) == "duplicate GPU indexes [3, 3]"


def test_a_record_whose_name_is_no_worker_name_is_invalid() -> None:
    why = read_worker("w.1", record(name="w.1"))
    assert isinstance(why, str) and "$.name" in why


def test_a_reason_is_one_bounded_line_whatever_the_record_holds() -> None:
    why = read_worker("w1", record(cluster="x\n" * 10_000))  # past the text limit, with newlines in it
    assert isinstance(why, str) and "\n" not in why and len(why) <= REASON_CHARS
    assert one_line("a\n  b\tc") == "a b c"


def test_each_invalid_record_is_reported_once() -> None:
    first = invalid_reports({"w1": "too many GPUs"}, {})
    assert first.report == {"w1": "too many GPUs"} and first.forget == ()
    again = invalid_reports({"w1": "too many GPUs"}, first.report)
    assert again.report == {} and again.forget == ()


def test_a_record_broken_another_way_is_reported_again() -> None:
    assert invalid_reports({"w1": "duplicate GPU indexes [3, 3]"}, {"w1": "too many GPUs"}).report == {
        "w1": "duplicate GPU indexes [3, 3]"
    }


def test_the_mark_of_a_record_repaired_or_removed_is_forgotten() -> None:
    got = invalid_reports({"w2": "bad"}, {"w1": "too many GPUs", "w2": "bad"})
    assert got.report == {} and got.forget == ("w1",)
