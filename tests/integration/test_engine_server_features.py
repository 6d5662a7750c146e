"""KV events, LoRA and prefill/decode disaggregation of the emulated model server, on a real NATS."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import httpx
import msgspec
import nats
import pytest

from ops.servers import ServerProcess, free_port
from services.engine_server.server import EmbeddedServer, ServerOptions
from shared.bus import subjects
from shared.bus.messages import EngineKVEvents, EngineMetrics, decode
from shared.core.kv_events import ROOT_HASH, BlockRemoved, BlockStored, chain_hashes, chain_root, lora_int_id

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

M = TypeVar("M", bound=msgspec.Struct)


@asynccontextmanager
async def _server(nats_url: str, instance: str, **kw: Any) -> AsyncIterator[EmbeddedServer]:
    srv = EmbeddedServer(ServerOptions(port=free_port(), nats_url=nats_url, instance_id=instance,
                                       metrics_interval_s=0.05, access_log=False, **kw))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@asynccontextmanager
async def _collect(nats_url: str, subject: str, kind: type[M]) -> AsyncIterator[list[M]]:
    nc = await nats.connect(nats_url)
    got: list[M] = []

    async def on_msg(msg: Any) -> None:
        got.append(decode(msg.data, kind))

    await nc.subscribe(subject, cb=on_msg)
    await nc.flush()
    try:
        yield got
    finally:
        await nc.drain()


async def _until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def _stored(msgs: list[EngineKVEvents]) -> list[BlockStored]:
    return [e for m in msgs for e in m.batch.events if isinstance(e, BlockStored)]


async def test_kv_events_name_the_chained_hashes_a_router_computes_and_evictions(nats_server: ServerProcess) -> None:
    prompts = [[1000 + 7 * i + j for j in range(64)] for i in range(6)]  # 4 full blocks each
    async with (_collect(nats_server.url, subjects.engine_kv_events("kv-1"), EngineKVEvents) as msgs,
                _server(nats_server.url, "kv-1", num_gpu_blocks=13, speedup=50.0) as srv):
        async with httpx.AsyncClient(base_url=srv.url) as http:
            for p in prompts:  # one after another: each evicts what the pool cannot keep
                r = await http.post("/v1/completions", json={"prompt": p, "max_tokens": 2, "ignore_eos": True})
                assert r.status_code == 200
        await _until(lambda: any(isinstance(e, BlockRemoved) for m in msgs for e in m.batch.events))
    assert [m.seq for m in msgs] == list(range(len(msgs)))
    assert all(m.instance_id == "kv-1" and m.model == "llama-3.1-8b-instruct" for m in msgs)
    stored = _stored(msgs)
    first = stored[0]
    assert first.parent_block_hash is None and first.block_size == 16
    assert first.block_hashes[:4] == chain_hashes(prompts[0], 16)
    assert first.token_ids[:64] == prompts[0]
    all_stored = {h for e in stored for h in e.block_hashes}
    removed = [h for m in msgs for e in m.batch.events if isinstance(e, BlockRemoved) for h in e.block_hashes]
    assert removed and set(removed) <= all_stored
    assert chain_hashes(prompts[0], 16)[0] in removed  # the oldest prefix went first


async def test_lora_adapters_wait_for_a_slot_and_show_in_pushed_and_scraped_metrics(
    nats_server: ServerProcess,
) -> None:
    async with (_collect(nats_server.url, subjects.engine_metrics("lora-1"), EngineMetrics) as pushed,
                _collect(nats_server.url, subjects.engine_kv_events("lora-1"), EngineKVEvents) as kv,
                _server(nats_server.url, "lora-1", num_gpu_blocks=400, speedup=2.0, max_loras=1,
                        lora_modules=("sql", "poet"), lora_load_s=0.1) as srv):
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
            body = {"prompt": [5] * 40, "max_tokens": 60, "ignore_eos": True}
            calls = [http.post("/v1/completions", json={**body, "model": m}) for m in ("sql", "poet")]
            load = asyncio.gather(*calls)
            scraped = ""
            while not load.done():
                text = (await http.get("/metrics")).text
                if 'waiting_lora_adapters="poet"' in text or 'waiting_lora_adapters="sql"' in text:
                    scraped = text
                await asyncio.sleep(0.03)
            results = await load
        await _until(lambda: bool(kv))
    assert [r.json()["model"] for r in results] == ["sql", "poet"]
    assert re.search(r'vllm:lora_requests_info\{max_lora="1",running_lora_adapters="(sql|poet)",'
                     r'waiting_lora_adapters="(sql|poet)"\}', scraped)
    both = [m for m in pushed if m.running_loras and m.waiting_loras]
    assert both and both[0].max_loras == 1 and set(both[0].running_loras + both[0].waiting_loras) == {"sql", "poet"}
    stored = _stored(kv)
    sql_root = chain_root(ROOT_HASH, lora_int_id("sql"))
    assert {e.lora_id for e in stored} == {lora_int_id("sql"), lora_int_id("poet")}
    sql_first = next(e for e in stored if e.lora_id == lora_int_id("sql"))
    assert sql_first.block_hashes[0] == chain_hashes([5] * 40, 16, parent=sql_root)[0]


async def test_prefill_hands_off_to_decode_which_waits_for_the_kv_transfer(nats_server: ServerProcess) -> None:
    prompt = [(11 * j) % 5000 + 3 for j in range(1000)]
    gbps = 10.0  # 1000 tokens x 128 KiB = 131 MB over 1.25 GB/s: about 105 ms
    async with (_collect(nats_server.url, subjects.engine_metrics("dec-1"), EngineMetrics) as dec_pushed,
                _collect(nats_server.url, subjects.engine_metrics("pre-1"), EngineMetrics) as pre_pushed,
                _server(nats_server.url, "pre-1", role="prefill", kv_link_gbps=gbps, speedup=1.0) as pre,
                _server(nats_server.url, "dec-1", role="decode", kv_link_gbps=gbps, speedup=1.0) as dec):
        async with httpx.AsyncClient(timeout=30) as http:
            first = await http.post(f"{pre.url}/v1/completions", json={
                "prompt": prompt, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}})
            assert first.status_code == 200
            params = first.json()["kv_transfer_params"]
            t0 = time.monotonic()
            second = await http.post(f"{dec.url}/v1/completions", json={
                "prompt": prompt, "max_tokens": 8, "ignore_eos": True, "kv_transfer_params": params})
            took = time.monotonic() - t0
            dec_metrics = (await http.get(f"{dec.url}/metrics")).text
        await _until(lambda: any(m.num_requests_waiting_for_remote_kv == 0 for m in dec_pushed[-1:]))
    transfer = params["num_bytes"] / (gbps * 1e9 / 8)
    assert params["do_remote_prefill"] is True and params["remote_engine_id"] == "pre-1"
    assert params["num_tokens"] == 1000 and params["num_bytes"] == 1000 * 131072
    assert first.json()["choices"][0]["finish_reason"] == "length"
    assert second.json()["usage"]["completion_tokens"] == 8
    assert took >= transfer
    m = re.search(r"^vllm:time_to_first_token_seconds_sum\{[^}]*\} (\S+)$", dec_metrics, re.M)
    assert m is not None
    ttft_sum = float(m[1])
    assert ttft_sum >= transfer
    assert pre_pushed[-1].role == "prefill" and dec_pushed[-1].role == "decode"
    assert any(m.num_requests_waiting_for_remote_kv == 1 for m in dec_pushed)
