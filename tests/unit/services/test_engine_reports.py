"""The model-server protocol at the pickers' boundary: engine reports the routing core would misread are
dead-lettered (decode refuses them, or the feed does), and what the feed accepts keeps the pool current."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from shared.bus.messages import EngineKVEvents, EngineMetrics, MessageError, decode, encode
from shared.core.kv_events import BlockStored, KVEventBatch
from shared.core.routing import Endpoint, Router, builtin_config
from shared.host.engine_feed import EngineFeed

NOW = 1_000.0


def report(ts: float = NOW, waiting: int = 0) -> EngineMetrics:
    return EngineMetrics(instance_id="e1", model="m", url="http://127.0.0.1:8001", ts=ts, num_requests_running=0,
                         num_requests_waiting=waiting, kv_cache_usage_perc=0.25, block_size=16, num_gpu_blocks=1000)


def with_field(name: str, value: Any) -> bytes:
    raw = msgspec.to_builtins(report())
    raw[name] = value
    return msgspec.json.encode(raw)


@pytest.mark.parametrize(("name", "value"), [
    ("num_requests_waiting", -1),  # a negative queue looks idler than any real one
    ("num_requests_running", -3),
    ("num_requests_waiting", 1 << 70),  # beyond 64 bits
    ("kv_cache_usage_perc", -0.5),
    ("kv_cache_usage_perc", 1.5),
    ("kv_cache_usage_perc", 1e308),
    ("ts", -1.0),
    ("ts", 1e300),
    ("block_size", 0),
    ("block_size", -16),
    ("num_gpu_blocks", -1),  # sized the server's precise index below zero: every stored block evicted at once
    ("num_gpu_blocks", 1 << 40),  # sized it without a bound
    ("instance_id", "a b"),
    ("instance_id", ""),
    ("running_loras", ["x"] * 20_000),
])
def test_an_engine_report_with_an_impossible_figure_is_refused(name: str, value: Any) -> None:
    with pytest.raises(MessageError):
        decode(with_field(name, value), EngineMetrics)


def test_a_real_engine_report_still_decodes() -> None:
    assert decode(encode(report()), EngineMetrics) == report()


def test_kv_events_with_a_negative_sequence_number_are_refused() -> None:
    ev = EngineKVEvents(instance_id="e1", model="m", seq=0, batch=KVEventBatch(ts=NOW, events=[]))
    raw = msgspec.to_builtins(ev)
    raw["seq"] = -1
    with pytest.raises(MessageError):
        decode(msgspec.json.encode(raw), EngineKVEvents)


def test_a_report_stamped_far_ahead_of_the_pickers_clock_is_refused_and_does_not_freeze_the_load() -> None:
    router = Router(builtin_config("default"))
    feed = EngineFeed(router, expire_s=3.0)
    feed.on_metrics(report(), NOW)
    with pytest.raises(ValueError, match="ahead"):
        feed.on_metrics(report(ts=NOW + 3_600, waiting=0), NOW + 0.05)
    feed.on_metrics(report(ts=NOW + 0.1, waiting=7), NOW + 0.1)  # the honest next report is taken
    metrics = router.state.endpoints["e1"].metrics
    assert metrics is not None and metrics.waiting == 7


def test_a_report_a_little_ahead_of_the_pickers_clock_is_taken() -> None:
    router = Router(builtin_config("default"))
    EngineFeed(router, expire_s=3.0).on_metrics(report(ts=NOW + 0.5), NOW)
    assert router.state.endpoints["e1"].metrics is not None


def test_a_non_positive_block_count_bounds_the_precise_index_by_the_default_not_below_zero() -> None:
    router = Router(builtin_config("default"))
    router.set_endpoints([Endpoint(id="e1", model="m", num_gpu_blocks=-5)])
    router.apply_kv_events("e1", KVEventBatch(ts=NOW, events=[
        BlockStored(block_hashes=[11, 12, 13], parent_block_hash=None, token_ids=[], block_size=16)]))
    assert router.state.precise.blocks_of(router.state.endpoints["e1"].slot) == 3


def test_kv_events_of_engines_not_in_the_pool_leave_nothing_behind() -> None:
    feed = EngineFeed(Router(builtin_config("default")), expire_s=3.0)
    for i in range(1000):
        feed.on_kv(EngineKVEvents(instance_id=f"ghost-{i}", model="m", seq=0, batch=KVEventBatch(ts=NOW, events=[])))
    assert feed._kv_seq == {}


def test_kv_events_of_a_pool_member_are_numbered_and_a_gap_clears_its_index() -> None:
    router = Router(builtin_config("default"))
    feed = EngineFeed(router, expire_s=3.0)
    feed.on_metrics(report(), NOW)
    stored = BlockStored(block_hashes=[1, 2], parent_block_hash=None, token_ids=[], block_size=16)
    feed.on_kv(EngineKVEvents(instance_id="e1", model="m", seq=0, batch=KVEventBatch(ts=NOW, events=[stored])))
    slot = router.state.endpoints["e1"].slot
    assert router.state.precise.blocks_of(slot) == 2
    feed.on_kv(EngineKVEvents(instance_id="e1", model="m", seq=5, batch=KVEventBatch(ts=NOW, events=[])))
    assert router.state.precise.blocks_of(slot) == 0


def kv(seq: int, *hashes: int) -> EngineKVEvents:
    """Engine e1's KV message ``seq`` storing ``hashes`` (none: an empty batch)."""
    events = [BlockStored(block_hashes=list(hashes), parent_block_hash=None, token_ids=[], block_size=16)]
    return EngineKVEvents(instance_id="e1", model="m", seq=seq, batch=KVEventBatch(ts=NOW, events=events if hashes
                                                                                     else []))


def test_a_repeated_kv_events_message_changes_nothing_and_the_next_one_is_not_taken_for_a_gap() -> None:
    router = Router(builtin_config("default"))
    feed = EngineFeed(router, expire_s=3.0)
    feed.on_metrics(report(), NOW)
    for m in (kv(0, 1), kv(1, 2), kv(2, 3), kv(1, 2), kv(2, 3), kv(3, 4)):  # 1 and 2 delivered twice
        feed.on_kv(m)
    assert router.state.precise.blocks_of(router.state.endpoints["e1"].slot) == 4


def test_one_message_numbered_far_ahead_does_not_make_the_engines_real_messages_look_already_applied() -> None:
    router = Router(builtin_config("default"))
    feed = EngineFeed(router, expire_s=3.0)  # no verifier: any client on the KV subject can send one
    feed.on_metrics(report(), NOW)
    for m in (kv(0, 1), kv(1, 2), kv((1 << 63) - 1), kv(2, 3), kv(3, 4), kv(4, 5)):
        feed.on_kv(m)
    slot = router.state.endpoints["e1"].slot
    # the forged jump cleared the index once; the engine's own numbering then took over again
    assert [router.state.precise.holds(slot, h) for h in (3, 4, 5)] == [True] * 3


def test_a_message_older_than_a_real_gap_is_still_a_repeat() -> None:
    router = Router(builtin_config("default"))
    feed = EngineFeed(router, expire_s=3.0)
    feed.on_metrics(report(), NOW)
    for m in (kv(0, 1), kv(1, 2), kv(5, 6), kv(1, 2), kv(6, 7)):  # 2-4 lost, then 1 delivered again
        feed.on_kv(m)
    slot = router.state.endpoints["e1"].slot
    assert router.state.precise.blocks_of(slot) == 2 and router.state.precise.holds(slot, 7)


def test_kv_events_numbered_from_0_again_are_a_restarted_server_and_clear_its_index() -> None:
    router = Router(builtin_config("default"))
    feed = EngineFeed(router, expire_s=3.0)
    feed.on_metrics(report(), NOW)
    for m in (kv(0, 1), kv(1, 2), kv(0, 7)):
        feed.on_kv(m)
    slot = router.state.endpoints["e1"].slot
    assert router.state.precise.blocks_of(slot) == 1 and router.state.precise.holds(slot, 7)


def test_the_gateway_feed_refuses_an_engine_url_naming_a_host_that_envoys_endpoint_file_cannot_take() -> None:
    pools: list[list[Endpoint]] = []
    feed = EngineFeed(Router(builtin_config("default")), on_pool=pools.append, ip_only=True)
    with pytest.raises(ValueError, match="IP addresses only"):
        feed.on_metrics(msgspec.structs.replace(report(), url="http://gpu-node-3:8000"), NOW)
    assert pools == [] and feed.addresses == {}
    feed.on_metrics(msgspec.structs.replace(report(), instance_id="e2", url="http://[::1]:8002"), NOW)
    feed.on_metrics(report(), NOW)
    assert feed.addresses == {"e2": "[::1]:8002", "e1": "127.0.0.1:8001"}


@pytest.mark.parametrize("url", ["http://[fe80::1%25eth0]:8002", "http://[fe80::1%nosuch]:8002",
                                 "http://[fe80::1%lo]:8002"])
def test_the_gateway_feed_refuses_an_ipv6_zone_which_envoys_endpoint_file_cannot_take(url: str) -> None:
    pools: list[list[Endpoint]] = []
    feed = EngineFeed(Router(builtin_config("default")), on_pool=pools.append, ip_only=True)
    with pytest.raises(ValueError, match="zone"):
        feed.on_metrics(msgspec.structs.replace(report(), instance_id="e2", url=url), NOW)
    feed.on_metrics(report(), NOW)
    assert feed.addresses == {"e1": "127.0.0.1:8001"}


def test_past_the_pool_bound_a_new_instance_is_refused_and_the_members_keep_reporting() -> None:
    feed = EngineFeed(Router(builtin_config("default")))
    feed.pool.max_endpoints = 2
    feed.on_metrics(report(), NOW)
    feed.on_metrics(msgspec.structs.replace(report(), instance_id="e2"), NOW)
    with pytest.raises(ValueError, match="pool full"):
        feed.on_metrics(msgspec.structs.replace(report(), instance_id="e3"), NOW)
    feed.on_metrics(report(ts=NOW + 0.1, waiting=4), NOW + 0.1)
    assert sorted(feed.addresses) == ["e1", "e2"] and "e3" not in feed.pool.last_heard
    metrics = feed.router.state.endpoints["e1"].metrics
    assert metrics is not None and metrics.waiting == 4
