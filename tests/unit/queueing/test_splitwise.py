"""Splitwise decisions: live nodes, blurred least load, node load (FastDeploy's splitwise scenarios)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from shared.core.queueing import NodeInfo, NodeLoad, assign, blurred_least_load, live_nodes
from shared.core.queueing.splitwise import decode_step, parse_node, prefill_step, transfer_protocol
from shared.core.roles import NodeRole

P, D, M = NodeRole.PREFILL, NodeRole.DECODE, NodeRole.MIXED


def node(name: str, role: NodeRole, load: int = 0, ts: float = 0.0, host: str = "",
         protocols: tuple[str, ...] = ("rdma",)) -> NodeInfo:
    return NodeInfo(node=name, role=role, load=load, ts=ts, host=host, protocols=protocols)


def test_live_nodes_drop_expired_heartbeats() -> None:
    nodes = [node("fresh", P, ts=9.0), node("old", D, ts=5.0), node("edge", D, ts=7.0)]
    assert [n.node for n in live_nodes(nodes, now=10.0, expire_s=3.0)] == ["fresh", "edge"]


@pytest.mark.parametrize("raw", [b'{"node":"x","role":"oracle"}', b"not json", b'{"role":"prefill"}'])
def test_a_record_with_an_unknown_role_or_bad_shape_is_ignored(raw: bytes) -> None:
    assert parse_node(raw) is None


def test_a_good_record_parses() -> None:
    assert parse_node(b'{"node":"x","role":"decode","load":3,"ts":1.5}') == node("x", D, 3, 1.5)


def test_a_mixed_node_takes_both_phases() -> None:
    a = assign(50, [node("m", M)], random.Random(0))
    assert a is not None and (a.prefill, a.decode, a.protocol) == ("m", None, None)


def test_prefill_without_decode_and_no_mixed_is_unservable() -> None:
    assert assign(50, [node("p", P)], random.Random(0)) is None
    assert assign(50, [node("d", D)], random.Random(0)) is None
    assert assign(50, [], random.Random(0)) is None


def test_only_mixed_nodes_serve_when_no_decode_node_is_alive() -> None:
    for seed in range(20):
        a = assign(50, [node("p", P), node("m", M, load=10_000)], random.Random(seed))
        assert a is not None and a.prefill == "m"


def test_p_and_d_on_different_hosts_move_kv_by_rdma() -> None:
    a = assign(50, [node("p", P, host="host-a"), node("d", D, host="host-b", protocols=("ipc", "rdma"))],
               random.Random(0))
    assert a is not None and (a.prefill, a.decode, a.protocol) == ("p", "d", "rdma")


def test_p_and_d_on_one_host_move_kv_by_ipc() -> None:
    p, d = node("p", P, host="h"), node("d", D, host="h", protocols=("ipc", "rdma"))
    assert transfer_protocol(p, d) == "ipc"
    assert transfer_protocol(p, node("d", D, host="h", protocols=("rdma",))) == "rdma"


@pytest.mark.parametrize(("prompt", "step"), [(50, 100), (400, 200), (999, 499), (1000, 100), (8000, 500),
                                              (100_000, 500)])
def test_prefill_window(prompt: int, step: int) -> None:
    assert prefill_step(prompt) == step


def test_decode_window_is_the_node_count_up_to_ten() -> None:
    assert [decode_step(n) for n in (1, 2, 10, 50)] == [1, 2, 10, 10]


def test_prefill_loads_5_and_20_are_both_eligible_for_a_50_token_prompt() -> None:
    nodes = [node("a", P, 5), node("b", P, 20)]
    picks = Counter(blurred_least_load(nodes, prefill_step(50), random.Random(s)).node for s in range(200))
    assert set(picks) == {"a", "b"}


def test_decode_loads_1_and_2_are_both_eligible() -> None:
    nodes = [node("a", D, 1), node("b", D, 2)]
    picks = Counter(blurred_least_load(nodes, decode_step(2), random.Random(s)).node for s in range(200))
    assert set(picks) == {"a", "b"}


def test_a_node_outside_the_window_is_never_picked() -> None:
    nodes = [node("a", P, 0), node("b", P, 99), node("c", P, 100)]
    picks = {blurred_least_load(nodes, 100, random.Random(s)).node for s in range(300)}
    assert picks == {"a", "b"}


def test_prefill_load_counts_prompt_tokens_and_decode_load_counts_requests() -> None:
    p, d = NodeLoad(P, release_s=600), NodeLoad(D, release_s=600)
    for ld in (p, d):
        ld.add("r1", 300, 0.0)
        ld.add("r2", 200, 0.0)
        ld.add("r1", 300, 0.0)  # counted once
    assert (p.load, d.load) == (500, 2)
    p.finish("r1")
    d.finish("r1")
    d.finish("r1")
    assert (p.load, d.load) == (200, 1)


def test_load_of_a_silent_request_is_released_after_the_release_period() -> None:
    ld = NodeLoad(M, release_s=600)
    ld.add("quiet", 100, 0.0)
    ld.add("busy", 50, 0.0)
    ld.touch("busy", 500.0)
    assert ld.expire(600.0) == ["quiet"] and ld.load == 50
