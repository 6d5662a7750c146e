"""Capture and replay: traffic routed through the real gateway (Envoy + picker with ``--capture``, real NATS,
emulated engine servers) is written as a Mooncake-style trace, and ``gantry simulate`` replays it with the
same request count and the same prompt and output lengths the engines reported."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ops.servers import ServerProcess
from shared.traces import load_trace
from tests.integration.test_gateway import (
    MODEL,
    REPO,
    Engine,
    Gateway,
    _engines,
    _gateway,
    _stop,
    _wait_routable,
    gateway_marks,
)

pytestmark = gateway_marks(180)


@pytest.fixture
def capturing(nats_server: ServerProcess, tmp_path: Path) -> Iterator[tuple[Gateway, Path]]:
    trace = tmp_path / "captured.jsonl"
    yield from ((gw, trace) for gw in _gateway(nats_server.url, tmp_path, 1, "--capture", str(trace)))


@pytest.fixture
def engines(nats_server: ServerProcess, tmp_path: Path) -> Iterator[list[Engine]]:
    yield from _engines(nats_server.url, tmp_path, 2)


def _send(url: str, i: int) -> tuple[int, int]:
    """One request of a varied mix; returns (prompt tokens, completion tokens) as the engine reported them."""
    words = " ".join(f"word{(i * 13 + k) % 97}" for k in range(40 + 90 * (i % 4)))  # up to ~1,500 tokens
    max_tokens = 3 + 5 * (i % 5)
    base: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "ignore_eos": True}
    kind = i % 3
    if kind == 0:  # non-streamed chat
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                       json={**base, "messages": [{"role": "user", "content": words}]})
        assert r.status_code == 200, r.text
        u = r.json()["usage"]
        return u["prompt_tokens"], u["completion_tokens"]
    if kind == 1:  # streamed chat with usage
        usage = None
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                          json={**base, "stream": True, "stream_options": {"include_usage": True},
                                "messages": [{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": words}]}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {") and '"usage":{' in line:
                    usage = json.loads(line[6:])["usage"]
        assert usage is not None
        return usage["prompt_tokens"], usage["completion_tokens"]
    # non-streamed completion (a prompt, no chat template)
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={**base, "prompt": words})
    assert r.status_code == 200, r.text
    u = r.json()["usage"]
    return u["prompt_tokens"], u["completion_tokens"]


def test_a_captured_gateway_trace_replays_in_simulate_with_the_same_requests_and_lengths(
        capturing: tuple[Gateway, Path], engines: list[Engine]) -> None:
    gw, trace = capturing
    _wait_routable(gw, len(engines))
    sent = [_send(gw.url, i) for i in range(15)]
    _stop(gw.picker)  # the picker flushes each line as its request ends; stopping it closes the file
    assert gw.picker.returncode == 0  # SIGTERM is a graceful stop: open requests end (and are written) first

    got = load_trace(str(trace))  # the loader `gantry simulate` uses for a .jsonl path
    warmup = len(got) - len(sent)  # _wait_routable's probe requests were routed (and captured) too, first
    assert warmup >= 1 and all(r.output_len == 1 for r in got[:warmup])
    assert Counter((r.prompt_len, r.output_len) for r in got[warmup:]) == Counter(sent)
    assert all(r.prefix_ids is not None and len(r.prefix_ids) == -(-r.prompt_len // 512) for r in got)
    assert [r.arrival_s for r in got] == sorted(r.arrival_s for r in got)
    assert all(MODEL in line for line in trace.read_text().splitlines())

    out = subprocess.run([sys.executable, "-m", "ops.cli", "simulate", "--trace", str(trace), "--replicas", "2",
                          "--router", "gantry", "--json"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["requests"] == summary["completed"] == len(got)
    span = summary["makespan_s"]
    assert round(summary["throughput"]["output_tokens_per_s"] * span) == sum(r.output_len for r in got)
    assert round(summary["throughput"]["input_tokens_per_s"] * span) == sum(r.prompt_len for r in got)
