"""Cluster-sized name lists on the bus: sent once per message, and one shared copy per process."""

from __future__ import annotations

import msgspec
import pytest

from shared.bus.columns import CandidateSet
from shared.bus.messages import (
    SCHEMA_VERSION,
    FilteredModel,
    FittedColumns,
    MessageError,
    PlacementFiltered,
    PlacementFitted,
    PlacementRequest,
    decode,
    encode,
)
from shared.bus.names import NameLists
from shared.core.placement.domain import FilterReport, FilterResult, FitResult, Reason

WORKERS = tuple(f"w{i}" for i in range(4))


def column_set(model: str, workers: tuple[str, ...] = WORKERS) -> CandidateSet:
    return CandidateSet(model=model, strategy="spread", workers=workers, gpus=bytes([3] * len(workers)), claim=7)


def fitted(*csets: CandidateSet) -> PlacementFitted:
    request = PlacementRequest(batch_id="b", items=(), specs={})
    results = {c.model: FitResult(model=c.model, strategy=c.strategy) for c in csets}
    return PlacementFitted.of(request, results, {c.model: c for c in csets})


def test_a_worker_list_shared_by_several_models_travels_once() -> None:
    msg = fitted(column_set("a"), column_set("b"), column_set("c", WORKERS[:2]))
    assert msg.worker_sets == (WORKERS, WORKERS[:2])
    assert encode(msg).count(b'"w3"') == 1


def test_candidate_sets_decode_back_unchanged_and_share_their_worker_list() -> None:
    sent = [column_set("a"), column_set("b")]
    got = decode(encode(fitted(*sent)), PlacementFitted)
    a, b = got.candidate_set("a"), got.candidate_set("b")
    assert [a, b] == sent
    assert a is not None and b is not None and a.workers is b.workers
    assert got.candidate_set("unknown") is None


def test_an_equal_name_list_is_swapped_for_the_first_copy_seen() -> None:
    lists = NameLists()
    first = lists.canonical(tuple(f"w{i}" for i in range(3)))
    again = lists.canonical(tuple(f"w{i}" for i in range(3)))
    other = lists.canonical(("w0", "w1"))
    assert again is first and other is not first


def test_name_lists_keep_a_bounded_number_of_copies() -> None:
    lists = NameLists(kept=2)
    for i in range(5):
        lists.canonical((f"w{i}",))
    assert len(lists._lists) <= 2


def test_models_of_one_shape_send_their_gpu_masks_and_claims_once() -> None:
    masks, claims = bytes([3, 1, 0, 2]), bytes(range(8))
    a = CandidateSet(model="a", strategy="spread", workers=WORKERS, gpus=masks, claims=claims)
    b = CandidateSet(model="b", strategy="spread", workers=WORKERS, gpus=bytes(masks), claims=bytes(claims))
    c = CandidateSet(model="c", strategy="spread", workers=WORKERS, gpus=bytes([1] * 4), claim=9)
    msg = fitted(a, b, c)
    assert msg.byte_sets == (masks, claims, bytes([1] * 4))
    got = decode(encode(msg), PlacementFitted)
    assert [got.candidate_set(m) for m in "abc"] == [a, b, c]
    ga, gb = got.candidate_set("a"), got.candidate_set("b")
    assert ga is not None and gb is not None and ga.gpus is gb.gpus


def test_a_fitted_message_with_inline_columns_still_reads() -> None:
    inline = PlacementFitted(
        request=PlacementRequest(batch_id="b", items=(), specs={}), fitted={}, worker_sets=(WORKERS,),
        columns={"a": FittedColumns(strategy="spread", workers=0, gpus=bytes([3] * 4), claim=7)},
    )
    assert decode(encode(inline), PlacementFitted).candidate_set("a") == column_set("a")


def test_filter_reports_shared_by_several_models_travel_once() -> None:
    reports = (FilterReport(filter="labels", kept=3, total=4,
                            dropped=(Reason(plugin="labels", subject="w3", message="no gold"),)),)
    other = (FilterReport(filter="labels", kept=4, total=4),)
    results = {
        "a": FilterResult(model="a", survivors=WORKERS[:3], reports=reports),
        "b": FilterResult(model="b", survivors=WORKERS[:3], reports=tuple(reports)),
        "c": FilterResult(model="c", survivors=WORKERS, reports=other),
    }
    msg = PlacementFiltered.of(PlacementRequest(batch_id="b", items=(), specs={}), results)
    assert msg.report_sets == (reports, other)
    assert encode(msg).count(b"no gold") == 1
    got = decode(encode(msg), PlacementFiltered)
    assert {m: got.result(m) for m in "abc"} == results


def test_a_filtered_message_with_inline_reports_still_reads() -> None:
    reports = (FilterReport(filter="labels", kept=4, total=4),)
    inline = PlacementFiltered(request=PlacementRequest(batch_id="b", items=(), specs={}), survivor_sets=(WORKERS,),
                               filtered={"a": FilteredModel(survivors=0, reports=reports)})
    assert decode(encode(inline), PlacementFiltered).result("a") == FilterResult(
        model="a", survivors=WORKERS, reports=reports
    )


@pytest.mark.parametrize("field, value", [("workers", -1), ("gpus_set", -2), ("claims_set", -5), ("workers", 1),
                                          ("gpus_set", 9), ("claims_set", 2**40)])
def test_a_fitted_table_position_out_of_range_is_refused_at_decode(field: str, value: int) -> None:
    raw = msgspec.json.decode(encode(fitted(column_set("a"))))
    raw["columns"]["a"][field] = value
    with pytest.raises(MessageError, match=field):
        decode(msgspec.json.encode(raw), PlacementFitted)


@pytest.mark.parametrize("field, value", [("survivors", -1), ("report_set", -2), ("survivors", 1), ("report_set", 7)])
def test_a_filtered_table_position_out_of_range_is_refused_at_decode(field: str, value: int) -> None:
    request = PlacementRequest(batch_id="b", items=(), specs={})
    msg = PlacementFiltered.of(request, {"a": FilterResult(model="a", survivors=WORKERS, reports=())})
    raw = msgspec.json.decode(encode(msg))
    raw["filtered"]["a"][field] = value
    with pytest.raises(MessageError, match=field):
        decode(msgspec.json.encode(raw), PlacementFiltered)


def test_a_consumer_of_the_schema_before_shared_tables_refuses_them_rather_than_reading_empty_columns() -> None:
    # Version 1 consumers read the inline fields only, which shared tables leave empty: the version must say so,
    # so that such a consumer dead-letters the message (it refuses a newer version than it knows).
    masks, claims = bytes([3, 1, 0, 2]), bytes(range(8))
    shared = fitted(CandidateSet(model="a", strategy="spread", workers=WORKERS, gpus=masks, claims=claims))
    assert shared.byte_sets and shared.v >= 2
    wire = msgspec.json.decode(encode(shared))
    assert wire["v"] == SCHEMA_VERSION >= 2
