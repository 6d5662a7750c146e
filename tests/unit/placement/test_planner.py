"""The reconcile planner, one behaviour per row (in the style of Nomad's reconciler tests).

Each row gives the inputs of one ``plan`` call and the plan fields it must produce; every other field of
the plan must be empty, so a row also says what the step must *not* do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.core.placement.domain import Instance, InstanceState, RestartMode, RestartPolicy, SubordinateWorker
from shared.core.placement.planner import (
    Ask,
    Book,
    Cluster,
    Commit,
    Failure,
    PendingRetry,
    Plan,
    Report,
    Restarts,
    Timings,
    Verdict,
    Want,
    needs_request,
    overdue_pending,
    plan,
    remove_worker,
    restart_delay,
)

S = InstanceState
NOW = 1_000.0
T = Timings(
    not_ready_after=3.0, reschedule_after=5.0, drain_timeout=10.0, forget_after=600.0, commit_retries=2,
    commit_backoff=0.5, pending_retry=1.0, pending_retry_max=8.0,
)
LIVE = Cluster(last_seen={"w1": NOW - 1, "w2": NOW - 1, "w3": NOW - 1})
QUICK = RestartPolicy(grace_s=10.0, backoff_s=20.0, max_backoff_s=100.0, reset_after_s=600.0)


def inst(
    iid: str, state: InstanceState = S.RUNNING, worker: str | None = "w1", model: str = "m", **kw: Any
) -> Instance:
    if state is S.PENDING and "worker" not in kw:
        worker = None
    return Instance(id=iid, model=model, state=state, worker=worker, gpu_indexes=(0,) if worker else (),
                    vram_claims=(1,) if worker else (), **kw)


def running(n: int, model: str = "m", prefix: str = "r") -> list[Instance]:
    return [inst(f"{prefix}{k}", model=model, worker=f"w{k % 3 + 1}") for k in range(n)]


def want(replicas: int | None = None, **kw: Any) -> dict[str, Want]:
    return {"m": Want(replicas=replicas, **kw)}


def silent(*workers: str, age: float) -> Cluster:
    return Cluster(last_seen={**LIVE.last_seen, **{w: NOW - age for w in workers}})


@dataclass(frozen=True)
class Row:
    name: str
    expect: Mapping[str, Any]
    desired: Mapping[str, Want] = field(default_factory=dict)
    instances: Sequence[Instance] = ()
    cluster: Cluster = LIVE
    verdicts: Sequence[Verdict] = ()
    book: Book = field(default_factory=Book)
    now: float = NOW


PR = PendingRetry

ROWS = [
    # ---------------------------------------------------------------- scale
    Row("scale up from zero creates every replica", {"create": {"m": 3}}, want(3)),
    Row("scale up creates only the missing replicas", {"create": {"m": 2}}, want(4), running(2)),
    Row("steady model does nothing", {}, want(2), running(2)),
    Row("pending replicas count as active: none created", {}, want(2), [inst("p0", S.PENDING), *running(1)]),
    Row("scale down removes pending replicas first", {"remove": ("p0",)}, want(2),
        [inst("p0", S.PENDING), *running(2)]),
    Row("scale down drains the placed replica the removal order ranks lowest", {"drain": ("r1",)},
        want(1, removal_order=("r1", "r0")), running(2)),
    Row("scale down without a removal order drains by id", {"drain": ("r0",)}, want(1), running(2)),
    Row("scale to zero removes pending and drains placed", {"remove": ("p0",), "drain": ("r0", "r1")},
        want(0), [inst("p0", S.PENDING), *running(2)]),
    Row("draining replicas do not count: a replacement is created", {"create": {"m": 1}}, want(2),
        [inst("d0", S.DRAINING), *running(1)]),
    Row("unreachable replicas do not count: a replacement is created", {"create": {"m": 1}}, want(2),
        [inst("u0", S.UNREACHABLE, worker="w9"), *running(1)]),
    Row("an error replica still counts until it is replaced", {"failures": {"e0": Failure(since=NOW)},
        "reasons": {"e0": "ERROR; replacing at 00:16:50 UTC (replacement 1 of this model, 10 s after failing)"}},
        want(2, restart=QUICK), [inst("e0", S.ERROR), *running(1)]),
    Row("no desired count leaves the model's replicas alone", {}, want(None), running(5)),
    Row("spec change alone creates and removes nothing", {}, {"m": Want(replicas=2, restart=QUICK)}, running(2)),
    Row("other models are planned independently", {"create": {"n": 1}, "drain": ("r0",)},
        {"m": Want(replicas=1), "n": Want(replicas=1)}, running(2)),
    # ---------------------------------------------------------------- liveness
    Row("a worker silent past not_ready + reschedule loses its replicas", {"unreachable": ("r0",), "converge": ("m",)},
        instances=running(1), cluster=silent("w1", age=8.5)),
    Row("a not-ready worker within reschedule_after keeps its replicas", {}, instances=running(1),
        cluster=silent("w1", age=6.0)),
    Row("a replica on a worker never heard from is lost", {"unreachable": ("r0",), "converge": ("m",)},
        instances=[inst("r0", worker="w7")]),
    Row("pending replicas are never lost (they hold no worker)", {}, instances=[inst("p0", S.PENDING)],
        cluster=Cluster(last_seen={})),
    Row("a gang replica is lost with any subordinate worker", {"unreachable": ("g",), "converge": ("m",)},
        instances=[inst("g", subordinates=(SubordinateWorker(worker="w2", gpu_indexes=(0,), vram_claims=(1,)),))],
        cluster=silent("w2", age=20.0)),
    Row("an error replica on a lost worker is lost too", {"unreachable": ("e0",), "converge": ("m",)},
        instances=[inst("e0", S.ERROR)], cluster=silent("w1", age=20.0),
        book=Book(failures={"e0": Failure(since=NOW - 1)})),
    Row("a just-started reconciler with stale stored seen times replaces nothing", {}, want(3), running(3),
        cluster=dataclasses.replace(silent("w1", "w2", "w3", age=300.0), listening_since=NOW - 1)),
    Row("after a restart a worker still silent past the limit since listening began is lost",
        {"unreachable": ("r0",), "converge": ("m",)}, instances=running(1),
        cluster=dataclasses.replace(silent("w1", age=300.0), listening_since=NOW - 8.5)),
    Row("a worker stored long silent is not forgotten at a restart", {},
        instances=[inst("u0", S.UNREACHABLE, worker="w9")],
        cluster=Cluster(last_seen={**LIVE.last_seen, "w9": NOW - 700}, listening_since=NOW - 1)),
    Row("a lost replica whose worker is back is deleted from it", {"delete": ("u0",)},
        instances=[inst("u0", S.UNREACHABLE)]),
    Row("a lost replica whose worker is still silent stays", {}, instances=[inst("u0", S.UNREACHABLE)],
        cluster=silent("w1", age=20.0)),
    Row("worker loss with a desired count creates the replacement in the same step",
        {"unreachable": ("r0",), "converge": ("m",), "create": {"m": 1}}, want(1), running(1),
        cluster=silent("w1", age=20.0)),
    # ---------------------------------------------------------------- drains
    Row("a drain past its timeout deletes the replica", {"delete": ("d0",)}, instances=[inst("d0", S.DRAINING)],
        book=Book(drains={"d0": NOW - 10.0})),
    Row("a drain within its timeout waits", {}, instances=[inst("d0", S.DRAINING)],
        book=Book(drains={"d0": NOW - 9.9})),
    Row("an idle report ends a drain at once", {"delete": ("d0",)}, instances=[inst("d0", S.DRAINING)],
        verdicts=[Report("d0", "w1", S.DRAINING, idle=True)], book=Book(drains={"d0": NOW})),
    Row("a deletion confirmation forgets a drained replica", {"forget": ("d0",)}, instances=[inst("d0", S.DRAINING)],
        verdicts=[Report("d0", "w1", S.DRAINING, deleted=True)], book=Book(drains={"d0": NOW})),
    Row("a deletion confirmation forgets a lost replica", {"forget": ("u0",)},
        instances=[inst("u0", S.UNREACHABLE)], cluster=silent("w1", age=20.0),
        verdicts=[Report("u0", "w1", S.UNREACHABLE, deleted=True)]),
    Row("a report from a worker that no longer holds the replica is ignored", {}, instances=[inst("d0", S.DRAINING)],
        verdicts=[Report("d0", "w2", S.DRAINING, idle=True)], book=Book(drains={"d0": NOW})),
    Row("a report on an unknown replica is ignored", {}, verdicts=[Report("zz", "w1", S.RUNNING, deleted=True)]),
    # ---------------------------------------------------------------- failures (restart policy)
    Row("an error report remembers when and why the replica failed",
        {"failures": {"r0": Failure(since=NOW, message="CUDA OOM")}},
        instances=running(1), verdicts=[Report("r0", "w1", S.ERROR, message="CUDA OOM")]),
    Row("an error replica is replaced after the grace period",
        {"delete": ("e0",), "converge": ("m",), "restarts": {"m": Restarts(count=1, last_at=NOW)}},
        want(restart=QUICK), [inst("e0", S.ERROR)], book=Book(failures={"e0": Failure(since=NOW - 10.0)})),
    Row("an error replica within the grace period says when it will be replaced",
        {"reasons": {"e0": "ERROR: OOM; replacing at 00:16:49 UTC (replacement 1 of this model, 10 s after failing)"}},
        want(restart=QUICK), [inst("e0", S.ERROR)],
        book=Book(failures={"e0": Failure(since=NOW - 1.0, message="OOM")})),
    Row("repeated replacements of a model back off",
        {"reasons": {"e0": "ERROR; replacing at 00:17:10 UTC (replacement 3 of this model, 50 s after failing)"}},
        want(restart=QUICK), [inst("e0", S.ERROR)],
        book=Book(failures={"e0": Failure(since=NOW - 20.0)}, restarts={"m": Restarts(count=2, last_at=NOW - 30)})),
    Row("the backoff resets after a quiet period",
        {"delete": ("e0",), "converge": ("m",), "restarts": {"m": Restarts(count=1, last_at=NOW)}},
        want(restart=QUICK), [inst("e0", S.ERROR)],
        book=Book(failures={"e0": Failure(since=NOW - 10.0)}, restarts={"m": Restarts(count=5, last_at=NOW - 600)})),
    Row("restart policy never keeps the failed replica",
        {"reasons": {"e0": "ERROR; not replaced (restart policy: never)"}},
        want(restart=RestartPolicy(mode=RestartMode.NEVER)), [inst("e0", S.ERROR)],
        book=Book(failures={"e0": Failure(since=NOW - 1000.0)})),
    Row("an error replica first seen now starts its grace period now",
        {"failures": {"e0": Failure(since=NOW)},
         "reasons": {"e0": "ERROR; replacing at 00:16:50 UTC (replacement 1 of this model, 10 s after failing)"}},
        want(restart=QUICK), [inst("e0", S.ERROR)]),
    Row("several failed replicas of a model due together are replaced in one step",
        {"delete": ("e0", "e1"), "converge": ("m",), "restarts": {"m": Restarts(count=1, last_at=NOW)},
         "create": {"m": 2}},
        want(2, restart=QUICK), [inst("e0", S.ERROR), inst("e1", S.ERROR, worker="w2")],
        book=Book(failures={"e0": Failure(since=NOW - 60), "e1": Failure(since=NOW - 60)})),
    Row("a worker deleting its failed replica gets it replaced at once", {"forget": ("e0",), "converge": ("m",)},
        instances=[inst("e0", S.ERROR)], verdicts=[Report("e0", "w1", S.ERROR, deleted=True)],
        book=Book(failures={"e0": Failure(since=NOW)})),
    # ---------------------------------------------------------------- commit verdicts
    Row("a committed decision is recorded and its retry forgotten", {"committed": ("p0",), "dropped": ("p0",)},
        verdicts=[Commit("p0", "m", "ok")]),
    Row("a redelivered commit re-sends the assignment", {"assign": ("p0",), "dropped": ("p0",)},
        verdicts=[Commit("p0", "m", "dup")]),
    Row("a commit for a replica removed in flight is dropped", {"dropped": ("p0",)},
        verdicts=[Commit("p0", "m", "gone")]),
    Row("a refused commit is placed again after the backoff",
        {"request": (Ask("p0", "m", attempt=1, delay=0.5),)}, verdicts=[Commit("p0", "m", "full:w1:0")]),
    Row("a commit the state layer refused as outside the limits is placed again like a refused one",
        {"request": (Ask("p0", "m", attempt=1, delay=0.5),)}, verdicts=[Commit("p0", "m", "invalid:claims")]),
    Row("each refusal doubles the backoff", {"request": (Ask("p0", "m", attempt=2, delay=1.0),)},
        verdicts=[Commit("p0", "m", "full:w1:0", attempt=1)]),
    Row("stale candidates are re-placed like a refused commit",
        {"request": (Ask("p0", "m", attempt=1, delay=0.5),)}, verdicts=[Commit("p0", "m", "stale", reason="taken")]),
    Row("past the retry bound a refused replica waits pending with the reason",
        {"pending": {"p0": "commit refused 3 times (last: full:w1:0); waiting for the cluster to change"},
         "retries": {"p0": PR(attempts=0, next_at=NOW + 1.0, requested_at=-float("inf"))}},
        cluster=Cluster(last_seen=LIVE.last_seen, changed_at=-float("inf")),
        verdicts=[Commit("p0", "m", "full:w1:0", attempt=2)]),
    Row("an unschedulable verdict waits pending, retried after the backoff",
        {"pending": {"p0": "needs 90 GiB"},
         "retries": {"p0": PR(attempts=3, next_at=NOW + 8.0, requested_at=NOW - 2)}},
        verdicts=[Commit("p0", "m", "unschedulable", reason="needs 90 GiB")],
        book=Book(retries={"p0": PR(attempts=3, next_at=NOW, requested_at=NOW - 2)})),
    Row("a verdict older than a cluster change is retried at the next step",
        {"pending": {"p0": "no room"}, "retries": {"p0": PR(attempts=0, next_at=NOW, requested_at=NOW - 2)}},
        cluster=Cluster(last_seen=LIVE.last_seen, changed_at=NOW - 1),
        verdicts=[Commit("p0", "m", "unschedulable", reason="no room")],
        book=Book(retries={"p0": PR(attempts=0, next_at=NOW + 5, requested_at=NOW - 2)})),
    # A replica requested twice (the first request outlived a reconciler restart) has two outcomes in one batch.
    Row("a replica committed in a batch is not placed again for its other, stale outcome",
        {"committed": ("p0",), "dropped": ("p0",)},
        verdicts=[Commit("p0", "m", "ok"), Commit("p0", "m", "stale", reason="taken")]),
    Row("a replica committed in a batch is committed whatever the order of its outcomes",
        {"committed": ("p0",), "dropped": ("p0",)},
        verdicts=[Commit("p0", "m", "unschedulable", reason="no room"), Commit("p0", "m", "ok")]),
    Row("a replica committed in a batch is not also re-sent for its second decision",
        {"committed": ("p0",), "dropped": ("p0",)},
        verdicts=[Commit("p0", "m", "ok"), Commit("p0", "m", "dup")]),
    Row("a redelivered commit beside a refused second decision re-sends the assignment only",
        {"assign": ("p0",), "dropped": ("p0",)},
        verdicts=[Commit("p0", "m", "full:w1:0"), Commit("p0", "m", "dup")]),
    Row("a commit in a batch leaves the other replicas' verdicts alone",
        {"committed": ("p0",), "dropped": ("p0",), "request": (Ask("p1", "m", attempt=1, delay=0.5),)},
        verdicts=[Commit("p0", "m", "ok"), Commit("p1", "m", "stale", reason="taken")]),
    # ---------------------------------------------------------------- PENDING liveness
    Row("a pending replica is retried when the cluster changed since its request",
        {"request": (Ask("p0", "m"),), "retries": {"p0": PR(attempts=2, next_at=NOW + 4.0, requested_at=NOW)}},
        instances=[inst("p0", S.PENDING, reason="no room")],
        cluster=Cluster(last_seen=LIVE.last_seen, changed_at=NOW - 1),
        book=Book(retries={"p0": PR(attempts=1, next_at=NOW + 50, requested_at=NOW - 2)})),
    Row("a pending replica is retried when its backoff has passed (periodic flush)",
        {"request": (Ask("p0", "m"),), "retries": {"p0": PR(attempts=1, next_at=NOW + 2.0, requested_at=NOW)}},
        instances=[inst("p0", S.PENDING, reason="no room")],
        book=Book(retries={"p0": PR(attempts=0, next_at=NOW, requested_at=NOW - 1)})),
    Row("a pending replica within its backoff and no change waits", {},
        instances=[inst("p0", S.PENDING, reason="no room")],
        book=Book(retries={"p0": PR(attempts=0, next_at=NOW + 0.5, requested_at=NOW - 0.5)})),
    Row("the periodic flush backs off up to its cap",
        {"request": (Ask("p0", "m"),), "retries": {"p0": PR(attempts=10, next_at=NOW + 8.0, requested_at=NOW)}},
        instances=[inst("p0", S.PENDING, reason="no room")],
        book=Book(retries={"p0": PR(attempts=9, next_at=NOW, requested_at=NOW - 8)})),
    Row("a pending replica nobody booked (reconciler restarted) is retried now",
        {"request": (Ask("p0", "m"),), "retries": {"p0": PR(attempts=0, next_at=NOW + 1.0, requested_at=NOW)}},
        instances=[inst("p0", S.PENDING, reason="no room")]),
    Row("a pending replica in flight (no reason yet) is left to its request", {},
        instances=[inst("p0", S.PENDING)]),
    Row("a pending replica removed by scale-down is not retried", {"remove": ("p0",)}, want(0),
        instances=[inst("p0", S.PENDING, reason="no room")]),
    # ---------------------------------------------------------------- cordon
    Row("replicas on a cordoned worker keep running", {}, want(2), running(2),
        cluster=Cluster(last_seen=LIVE.last_seen, cordoned=frozenset({"w1"}))),
    Row("a lost replica whose worker is back but cordoned stays lost", {},
        instances=[inst("u0", S.UNREACHABLE)], cluster=Cluster(last_seen=LIVE.last_seen, cordoned=frozenset({"w1"}))),
    # ---------------------------------------------------------------- worker lifecycle
    Row("a worker silent past forget_after with nothing on it is forgotten", {"forget_workers": ("w9",)},
        cluster=Cluster(last_seen={**LIVE.last_seen, "w9": NOW - 601})),
    Row("a forgotten worker takes its lost records with it", {"forget_workers": ("w9",), "forget": ("u0",)},
        instances=[inst("u0", S.UNREACHABLE, worker="w9")],
        cluster=Cluster(last_seen={**LIVE.last_seen, "w9": NOW - 601})),
    Row("a silent worker still holding a draining replica is kept", {},
        instances=[inst("d0", S.DRAINING, worker="w9")],
        cluster=Cluster(last_seen={**LIVE.last_seen, "w9": NOW - 601}),
        book=Book(drains={"d0": NOW - 1})),
    Row("a worker silent for less than forget_after is kept", {},
        cluster=Cluster(last_seen={**LIVE.last_seen, "w9": NOW - 599})),
    Row("a replica lost in the same step as its long-silent worker is forgotten with it",
        {"forget_workers": ("w9",), "forget": ("r0",), "converge": ("m",)},
        instances=[inst("r0", worker="w9")], cluster=Cluster(last_seen={**LIVE.last_seen, "w9": NOW - 700})),
]


def _empty(name: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(Plan)}[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_plan(row: Row) -> None:
    got = plan(row.desired, row.instances, row.cluster, row.verdicts, row.now, row.book, T)
    for f in dataclasses.fields(Plan):
        expected = row.expect.get(f.name, _empty(f.name))
        actual = getattr(got, f.name)
        assert actual == expected, f"{f.name}: {actual!r} != {expected!r}"


def test_rows_are_many_and_distinct() -> None:
    assert len(ROWS) >= 40
    assert len({r.name for r in ROWS}) == len(ROWS)


def test_plan_is_deterministic_and_does_not_depend_on_input_order() -> None:
    insts = [inst("p0", S.PENDING, reason="x"), *running(3), inst("d0", S.DRAINING), inst("e0", S.ERROR)]
    book = Book(drains={"d0": NOW - 100}, failures={"e0": Failure(since=NOW - 100)})
    a = plan(want(2), insts, LIVE, (), NOW, book, T)
    b = plan(want(2), list(reversed(insts)), LIVE, (), NOW, book, T)
    assert a == b


@pytest.mark.parametrize("beside", [(), (Commit("p0", "m", "ok"),)], ids=["alone", "beside-a-commit"])
def test_an_unknown_commit_verdict_is_an_error_not_a_silent_drop(beside: tuple[Commit, ...]) -> None:
    with pytest.raises(ValueError, match="unknown commit verdict"):
        plan({}, [], LIVE, [*beside, Commit("p0", "m", "maybe")], NOW, Book(), T)


@pytest.mark.parametrize(("count", "delay"), [(0, 10.0), (1, 30.0), (2, 50.0), (3, 90.0), (9, 110.0)])
def test_restart_delay_is_grace_then_capped_exponential_backoff(count: int, delay: float) -> None:
    assert restart_delay(QUICK, count) == delay


@pytest.mark.parametrize(
    ("last", "expected"), [(None, True), (NOW - 31, True), (NOW - 29, False)], ids=["never", "long-ago", "recently"]
)
def test_a_replica_in_flight_is_requested_again_only_after_the_timeout(last: float | None, expected: bool) -> None:
    assert needs_request(last, NOW, 30.0) is expected


def test_removing_a_live_worker_is_refused_in_one_line() -> None:
    why = remove_worker("w1", running(1), LIVE, NOW, T)
    assert why == "worker w1 is alive (heard 1.0 s ago, holds 1 replica(s)); stop it first or it registers again"


def test_removing_an_unknown_worker_is_refused() -> None:
    assert remove_worker("nope", [], LIVE, NOW, T) == "unknown worker 'nope'"


def test_removing_a_silent_worker_forgets_everything_placed_on_it() -> None:
    insts = [inst("a", worker="w9"), inst("b", S.UNREACHABLE, worker="w9", model="n"), inst("c", worker="w1")]
    got = remove_worker("w9", insts, Cluster(last_seen={"w9": NOW - 100}), NOW, T)
    assert not isinstance(got, str)
    assert (got.forget, got.models) == (("a", "b"), ("m", "n"))


def test_a_worker_known_only_by_an_invalid_stored_record_may_be_removed() -> None:
    # no snapshot holds it (its record breaks today's limits): removing it is how an operator clears the record
    insts = [inst("a", S.UNREACHABLE, worker="w9"), inst("c", worker="w1")]
    got = remove_worker("w9", insts, LIVE, NOW, T, invalid_record=True)
    assert not isinstance(got, str)
    assert (got.worker, got.forget, got.models) == ("w9", ("a",), ("m",))


def test_refused_commits_of_one_batch_wait_for_the_shortest_backoff() -> None:
    verdicts = [Commit("a", "m", "full:w1:0", attempt=1), Commit("b", "m", "full:w1:1", attempt=0)]
    got = plan({}, [], LIVE, verdicts, NOW, Book(), T)
    assert [a.delay for a in got.request] == [1.0, 0.5]
    assert got.request_delay() == 0.5
    assert plan({}, [], LIVE, (), NOW, Book(), T).request_delay() == 0.0


@pytest.mark.parametrize("bad", [-1.0, float("nan"), 1e300], ids=["negative", "nan", "huge"])
def test_a_restart_policy_delay_out_of_bounds_does_not_decode(bad: float) -> None:
    import msgspec

    from shared.core.placement.domain import ModelSpec

    with pytest.raises(msgspec.ValidationError, match=r"restart\.grace_s"):
        msgspec.convert({"name": "m", "restart": {"grace_s": bad}}, type=ModelSpec)


def test_pending_replicas_not_requested_within_the_timeout_are_the_ones_checked_against_the_store() -> None:
    insts = [
        inst("fresh", S.PENDING), inst("quiet", S.PENDING), inst("waiting", S.PENDING, reason="no room"),
        inst("never", S.PENDING), inst("placed", S.SCHEDULED),
    ]
    requested = {"fresh": NOW - 1, "quiet": NOW - 31, "waiting": NOW - 40, "placed": NOW - 100}
    assert overdue_pending(insts, requested, NOW, 30.0) == ("never", "quiet", "waiting")


@given(
    seen=st.dictionaries(st.sampled_from([f"w{i}" for i in range(8)]),
                         st.floats(allow_nan=True, allow_infinity=True), max_size=8),
    # Any since (NaN too), and one recent enough that no silence can exceed the limit (the one-pass shortcut).
    since=st.floats() | st.floats(-1e6, 1e6), now=st.floats(allow_nan=False) | st.floats(-1e6, 1e6),
    limit=st.floats(allow_nan=False) | st.floats(0, 1e6),
)
def test_one_pass_liveness_sets_are_the_per_worker_silence_comparisons(
    seen: dict[str, float], since: float, now: float, limit: float
) -> None:
    cluster = Cluster(last_seen=seen, listening_since=since)
    assert cluster.heard_within(limit, now) == {w for w in seen if cluster.silent(w, now) <= limit}
    assert cluster.silent_over(limit, now) == {w for w in seen if cluster.silent(w, now) > limit}


def test_workers_count_as_silent_past_the_limit_only_once_listening_for_longer_than_it() -> None:
    seen = {"old": NOW - 10_000.0, "fresh": NOW - 1.0}
    listening = Cluster(last_seen=seen, listening_since=NOW - 600.0)
    assert listening.silent_over(600.0, NOW) == set()  # silence counts from listening_since at the earliest
    assert listening.heard_within(600.0, NOW) == {"old", "fresh"}
    longer = Cluster(last_seen=seen, listening_since=NOW - 600.5)
    assert longer.silent_over(600.0, NOW) == {"old"}
    assert longer.heard_within(600.0, NOW) == {"fresh"}
