"""A picker's pool from placement: reporting engines enter the router and the endpoint set only while their
instance is RUNNING; a drain or a delete takes them out at once; events heard while the instances were being
read are applied after the first read, in order; once loaded, events apply at once, and a later read leaves the
instances they touched alone."""

from __future__ import annotations

from shared.bus.messages import EngineMetrics, InstanceEvent, InstanceEvents
from shared.core.placement.domain import Instance, InstanceState
from shared.core.routing import Endpoint, Router, builtin_config
from shared.core.routing.pool_source import PoolSource
from shared.host.engine_feed import EngineFeed, PlacedInstances

NOW = 1_000.0
S = InstanceState


def report(iid: str, port: int, model: str = "m") -> EngineMetrics:
    return EngineMetrics(instance_id=iid, model=model, url=f"http://127.0.0.1:{port}", ts=NOW,
                         num_requests_running=0, num_requests_waiting=0, kv_cache_usage_perc=0.0, block_size=16,
                         num_gpu_blocks=1000)


def inst(iid: str, state: InstanceState, model: str = "m") -> Instance:
    return Instance(id=iid, model=model, state=state, worker="w1")


def events(*changes: tuple[Instance, bool]) -> InstanceEvents:
    return InstanceEvents(events=tuple(InstanceEvent(instance=i, removed=gone, at=NOW) for i, gone in changes))


class Pool:
    def __init__(self) -> None:
        self.placed = PlacedInstances()
        self.router = Router(builtin_config("default"))
        self.sets: list[list[str]] = []
        self.feed = EngineFeed(self.router, on_pool=lambda eps: self.sets.append(sorted(e.id for e in eps)),
                               source=PoolSource.PLACEMENT, placed=self.placed.placed)

    def hear(self, evs: InstanceEvents) -> None:
        if self.placed.apply(evs):
            self.feed.placement_changed()

    def load(self, *instances: Instance) -> None:
        self.placed.load(instances)
        self.feed.placement_changed()

    def routed(self) -> list[str]:
        return sorted(self.feed.addresses)

    def in_router(self) -> list[str]:
        return sorted(self.router.state.endpoints)


def test_an_engine_is_routed_only_while_its_instance_runs() -> None:
    pool = Pool()
    pool.load(inst("a", S.STARTING), inst("b", S.RUNNING))
    pool.feed.on_metrics(report("a", 8001), NOW)
    pool.feed.on_metrics(report("b", 8002), NOW)
    pool.feed.on_metrics(report("stray", 8003), NOW)  # placement never issued this id
    assert pool.routed() == ["b"] and pool.in_router() == ["b"] and "stray" not in pool.feed.pool.endpoints
    pool.hear(events((inst("a", S.RUNNING), False)))
    assert pool.routed() == ["a", "b"]
    pool.hear(events((inst("b", S.DRAINING), False)))  # scale-down: out at once, though it still reports
    pool.feed.on_metrics(report("b", 8002), NOW + 0.1)
    assert pool.routed() == ["a"] and pool.in_router() == ["a"]
    pool.hear(events((inst("a", S.RUNNING), True)))  # deleted
    assert pool.routed() == [] and pool.sets == [["b"], ["a", "b"], ["a"], []]


def test_ids_placement_never_issued_take_no_slot_in_the_pool() -> None:
    pool = Pool()
    pool.feed.pool.max_endpoints = 2
    pool.load(inst("a", S.RUNNING))
    for n in range(5):
        pool.feed.on_metrics(report(f"forged{n}", 9000 + n), NOW)
    pool.feed.on_metrics(report("a", 8001), NOW)
    assert pool.routed() == ["a"] and sorted(pool.feed.pool.endpoints) == ["a"]


def test_an_engine_reporting_another_model_than_its_instance_is_not_routed() -> None:
    pool = Pool()
    pool.load(inst("a", S.RUNNING, model="m"))
    pool.feed.on_metrics(report("a", 8001, model="other"), NOW)
    assert pool.routed() == []


def test_a_change_that_does_not_move_the_routable_set_rewrites_nothing() -> None:
    pool = Pool()
    pool.load(inst("a", S.RUNNING))
    pool.feed.on_metrics(report("a", 8001), NOW)
    pool.hear(events((inst("x", S.PENDING), False), (inst("x", S.SCHEDULED), False)))
    assert pool.sets == [["a"]]


def test_events_heard_during_the_load_are_applied_after_it_in_order() -> None:
    pool = Pool()
    pool.feed.on_metrics(report("a", 8001), NOW)
    # heard before the store's answer: RUNNING, then DRAINING (the store read before both said STARTING)
    pool.hear(events((inst("a", S.RUNNING), False)))
    pool.hear(events((inst("a", S.DRAINING), False)))
    assert not pool.placed.loaded and pool.routed() == []
    pool.load(inst("a", S.STARTING))
    assert pool.placed.placed["a"].state is S.DRAINING and pool.routed() == []


def test_the_engines_source_routes_every_reporting_engine() -> None:
    router = Router(builtin_config("default"))
    feed = EngineFeed(router)
    feed.on_metrics(report("anything", 8001), NOW)
    assert sorted(feed.addresses) == ["anything"] and isinstance(router.state.endpoints["anything"].endpoint,
                                                                  Endpoint)


def test_a_later_read_of_the_store_corrects_an_event_that_was_missed() -> None:
    pool = Pool()
    pool.load(inst("a", S.RUNNING), inst("b", S.RUNNING))
    pool.feed.on_metrics(report("a", 8001), NOW)
    pool.feed.on_metrics(report("b", 8002), NOW)
    # b's DRAINING event was lost in a NATS outage: the next read of the store takes it out
    pool.placed.reading()
    pool.hear(events((inst("a", S.RUNNING), False)))  # heard during the read: applies at once, the read keeps it
    pool.load(inst("a", S.RUNNING), inst("b", S.DRAINING))
    assert pool.routed() == ["a"]


def test_a_drain_heard_during_a_later_read_takes_the_engine_out_at_once() -> None:
    pool = Pool()
    pool.load(inst("a", S.RUNNING), inst("b", S.RUNNING))
    pool.feed.on_metrics(report("a", 8001), NOW)
    pool.feed.on_metrics(report("b", 8002), NOW)
    pool.placed.reading()  # a resync starts; the store may take long to answer (or never)
    pool.hear(events((inst("b", S.DRAINING), False)))
    assert pool.routed() == ["a"]  # not held back until the read ends
    pool.placed.load(None)  # the read failed: what is held stands
    pool.feed.placement_changed()
    assert pool.placed.loaded and pool.routed() == ["a"]


def test_a_later_read_leaves_the_instances_heard_of_during_it_alone() -> None:
    pool = Pool()
    pool.load(inst("a", S.RUNNING), inst("b", S.RUNNING), inst("c", S.RUNNING))
    for iid, port in (("a", 8001), ("b", 8002), ("c", 8003)):
        pool.feed.on_metrics(report(iid, port), NOW)
    pool.placed.reading()
    pool.hear(events((inst("b", S.DRAINING), False)))
    pool.hear(events((inst("c", S.RUNNING), True)))  # deleted
    # the store answered from before both events: it must not bring b back to RUNNING nor c back at all
    pool.load(inst("a", S.RUNNING), inst("b", S.RUNNING), inst("c", S.RUNNING))
    assert pool.routed() == ["a"] and "c" not in pool.placed.placed
    pool.placed.reading()  # the next read starts afresh: what it says of b stands
    pool.load(inst("a", S.RUNNING), inst("b", S.RUNNING))
    assert pool.routed() == ["a", "b"]
