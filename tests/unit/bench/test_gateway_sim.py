"""bench/gateway_sim.py: the live bench's requests become trace requests the engines hash alike, and the
model of sglang-router's cache_aware policy follows its documented rules (hand-worked cases)."""

from __future__ import annotations

from typing import Any, cast

from bench.gateway_sim import BLOCK, SglangCacheAware, trace_of
from bench.gateway_vs_sglang import Workload, requests_of
from services.engine_server.textgen import TextModel
from shared.core.engine import Engine, Request

ENGINES = cast(list[Engine], [object(), object(), object()])  # the policy only counts them


def req(rid: str, ids: list[int], prompt_len: int) -> Request:
    return Request(rid, max_tokens=4, prompt_len=prompt_len, prefix_ids=ids, prefix_unit=BLOCK)


def test_the_trace_has_the_engine_servers_token_counts_and_one_group_shares_its_leading_blocks() -> None:
    w = Workload(groups=2, rate=10, seconds=3, seed=0)
    text = TextModel()
    bodies: list[dict[str, Any]] = [b for _, b in requests_of(w)]
    trace = trace_of(w, text)
    assert len(trace) == len(bodies)
    for tr, body in zip(trace, bodies, strict=True):
        n = len(text.chat_prompt([(m["role"], m["content"]) for m in body["messages"]]))
        assert tr.prompt_len == n and tr.output_len == 32
        assert tr.prefix_ids is not None and len(tr.prefix_ids) == n // BLOCK and tr.prefix_unit == BLOCK
    group = [body["messages"][0]["content"] for body in bodies]
    a, b = next((i, j) for i in range(len(bodies)) for j in range(i + 1, len(bodies)) if group[i] == group[j])
    ids_a, ids_b = trace[a].prefix_ids, trace[b].prefix_ids
    assert ids_a is not None and ids_b is not None
    shared = next(k for k in range(min(len(ids_a), len(ids_b))) if ids_a[k] != ids_b[k])
    assert shared >= 50  # the ~1,000-token system prompt; the unique question then diverges


def test_cache_aware_sends_new_prefixes_to_the_smallest_tree_and_matches_above_the_threshold_home() -> None:
    ca = SglangCacheAware()
    assert ca.pick(ENGINES, 0.0, req("a", list(range(10)), 160)) == 0  # all trees empty: the first
    assert ca.pick(ENGINES, 0.0, req("b", list(range(100, 110)), 160)) == 1  # trees 10 / 0 / 0 -> 1 (tie: first)
    # 4 of 10 blocks on worker 0: 64 / 160 tokens = 0.4 > 0.3
    assert ca.pick(ENGINES, 0.0, req("c", [0, 1, 2, 3, 200, 201, 202, 203, 204, 205], 160)) == 0
    # 3 of 10 blocks on worker 1: 48 / 160 = 0.3, not above the threshold: smallest tree (worker 2, empty)
    assert ca.pick(ENGINES, 0.0, req("d", [100, 101, 102, 300, 301, 302, 303, 304, 305, 306], 160)) == 2


def test_cache_aware_routes_to_the_least_loaded_worker_only_when_both_imbalance_thresholds_are_passed() -> None:
    ca = SglangCacheAware(balance_abs=1, balance_rel=1.5)
    first = req("a", list(range(10)), 160)
    assert ca.pick(ENGINES, 0.0, first) == 0
    assert ca.pick(ENGINES, 0.0, req("b", list(range(10)), 160)) == 0  # loads 1/0/0: 1 - 0 is not > 1
    # loads 2/0/0: 2 - 0 > 1 and 2 > 1.5 x 0: the least loaded (worker 1), though worker 0 holds the prefix
    assert ca.pick(ENGINES, 0.0, req("c", list(range(10)), 160)) == 1
    first.finish_time = 1.0  # finished requests leave the load: 1/1/0 after "a" is done
    assert ca.pick(ENGINES, 2.0, req("d", list(range(10)), 160)) == 0


def test_a_profile_file_runs_on_engines_that_publish_kv_events_as_the_built_in_profiles_do(tmp_path: Any) -> None:
    from pathlib import Path

    from bench.gateway_sim import spec_for

    profile = Path(tmp_path) / "p.yaml"
    profile.write_text((Path(__file__).resolve().parents[3] / "shared/core/routing/profiles/default.yaml").read_text())
    built_in, from_file = spec_for("gantry", 3200), spec_for(f"file:{profile}", 3200)
    assert built_in.config.enable_kv_events and from_file.config.enable_kv_events
    assert not spec_for("sglang-ca", 3200).config.enable_kv_events  # sglang-router reads no KV events
