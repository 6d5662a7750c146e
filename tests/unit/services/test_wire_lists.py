"""Cluster-sized name lists on the bus: sent once per message, and one shared copy per process."""

from __future__ import annotations

from shared.bus.columns import CandidateSet
from shared.bus.messages import PlacementFitted, PlacementRequest, decode, encode
from shared.bus.names import NameLists
from shared.core.placement.domain import FitResult

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
