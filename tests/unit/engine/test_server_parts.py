"""Pieces of the emulated model server that need no HTTP: runner, text model, metrics text, sockets."""

from __future__ import annotations

import asyncio
import socket

from services.engine_server.prometheus import EngineCollector, registry_for, render
from services.engine_server.runner import CollectSink, EngineRunner
from services.engine_server.server import set_nodelay
from services.engine_server.textgen import TextModel
from shared.core.engine import CalibratedStepTime, Engine, FinishReason, Request, SchedulerConfig

MODEL = CalibratedStepTime(base_s=0.01, per_token_s=1e-5)


def _engine() -> Engine:
    return Engine(SchedulerConfig(num_gpu_blocks=100), MODEL, fast_forward=False)


async def _drain(sink: CollectSink) -> tuple[list[int], str | None]:
    reason, _ = await sink.done
    return sink.token_ids, reason


async def test_runner_streams_one_token_per_step_and_records_latencies() -> None:
    runner = EngineRunner(_engine(), speedup=50.0)
    runner.start()
    sinks = [CollectSink() for _ in range(3)]
    for i, sink in enumerate(sinks):
        runner.submit(Request(f"r{i}", [i] * 30, max_tokens=5 + i, ignore_eos=True), sink)
    results = await asyncio.wait_for(asyncio.gather(*(_drain(s) for s in sinks)), 5)
    await runner.stop()
    assert [len(t) for t, _ in results] == [5, 6, 7]
    assert {r for _, r in results} == {"length"}
    assert runner.hists.ttft.total == 3 and runner.hists.e2e.total == 3
    assert runner.hists.itl.total == 4 + 5 + 6
    assert runner.engine.scheduler.kv.num_free == 99


async def test_runner_sleeps_step_time_over_speedup() -> None:
    runner = EngineRunner(_engine(), speedup=2.0)
    runner.start()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    sink = CollectSink()
    runner.submit(Request("r", [1] * 10, max_tokens=10, ignore_eos=True), sink)
    await asyncio.wait_for(_drain(sink), 5)
    await runner.stop()
    assert loop.time() - t0 >= 10 * 0.01 / 2 * 0.9


async def test_an_aborted_request_ends_with_abort_and_frees_its_blocks() -> None:
    runner = EngineRunner(_engine(), speedup=1.0)
    runner.start()
    sink = CollectSink()
    st = runner.submit(Request("r", [1] * 40, max_tokens=1000, ignore_eos=True), sink)
    while not sink.token_ids:
        await asyncio.sleep(0.001)
    runner.abort(st.req)
    _, reason = await asyncio.wait_for(_drain(sink), 5)
    await runner.stop()
    assert reason == "abort" and st.req.finish_reason is FinishReason.ABORT
    assert runner.engine.scheduler.kv.num_free == 99 and not runner.engine.has_work()


def test_sampled_text_re_tokenizes_to_the_same_token_count() -> None:
    tm = TextModel(mean_output_len=64)
    toks = tm.sample("seed-1", 200, ignore_eos=True)
    assert len(toks) == 200 and tm.eos_token_id not in toks
    assert tm.encode(tm.detokenize(toks)) == toks


def test_without_ignore_eos_the_model_ends_with_eos_at_a_seeded_length() -> None:
    tm = TextModel(mean_output_len=8)
    a, b = tm.sample("x", 1000, ignore_eos=False), tm.sample("x", 1000, ignore_eos=False)
    assert a == b and a[-1] == tm.eos_token_id and len(a) <= 15


def _scrape(runner: EngineRunner, model: str = "m") -> str:
    return render(registry_for(EngineCollector(runner, model))).decode()


def test_metrics_text_uses_vllm_names_and_cumulative_buckets() -> None:
    runner = EngineRunner(_engine())
    runner.hists.ttft.observe(0.03)
    runner.hists.ttft.observe(3.0)
    c = runner.engine.scheduler.counters
    c.prefix_hits, c.finished_by_reason["length"] = 4, 3
    text = _scrape(runner)
    assert 'vllm:num_requests_running{engine="0",model_name="m"} 0.0' in text
    assert 'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.0' in text
    assert 'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 4.0' in text
    assert 'vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 3.0' in text
    assert 'vllm:time_to_first_token_seconds_bucket{engine="0",le="0.04",model_name="m"} 1.0' in text
    assert 'vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 2.0' in text
    assert 'num_gpu_blocks="100"' in text


async def test_the_tokens_per_step_histogram_counts_every_step_at_each_scrape() -> None:
    runner = EngineRunner(_engine(), speedup=50.0)
    runner.start()
    sinks = [CollectSink() for _ in range(2)]
    for i, sink in enumerate(sinks):
        runner.submit(Request(f"r{i}", [i] * 30, max_tokens=4, ignore_eos=True), sink)
    await asyncio.wait_for(asyncio.gather(*(_drain(s) for s in sinks)), 5)

    def steps_in_histogram() -> float:
        line = next(ln for ln in _scrape(runner).splitlines() if ln.startswith("vllm:iteration_tokens_total_count"))
        return float(line.rsplit(" ", 1)[1])

    first = steps_in_histogram()
    assert first == runner.lag.steps > 0
    sink = CollectSink()
    runner.submit(Request("r9", [9] * 30, max_tokens=3, ignore_eos=True), sink)
    await asyncio.wait_for(_drain(sink), 5)
    await runner.stop()
    assert steps_in_histogram() == runner.lag.steps > first  # the second scrape adds the steps run since


def test_a_quote_and_backslash_in_the_model_name_are_escaped() -> None:
    text = _scrape(EngineRunner(_engine()), model='my "quoted" \\ model')
    line = next(ln for ln in text.splitlines() if ln.startswith("vllm:num_requests_waiting{"))
    assert line == 'vllm:num_requests_waiting{engine="0",model_name="my \\"quoted\\" \\\\ model"} 0.0'
    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["vllm:num_requests_waiting"].samples[0].labels["model_name"] == 'my "quoted" \\ model'


async def test_streaming_connections_disable_nagle() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
    try:
        assert set_nodelay(writer.transport) is True
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        writer.close()
        server.close()
        await server.wait_closed()


async def test_an_embedded_server_answers_and_stops() -> None:
    import httpx

    from ops.servers import free_port
    from services.engine_server.server import EmbeddedServer, ServerOptions

    srv = EmbeddedServer(ServerOptions(port=free_port(), num_gpu_blocks=50, speedup=100.0))
    await srv.start()
    try:
        async with httpx.AsyncClient(base_url=srv.url) as http:
            assert (await http.get("/health")).status_code == 200
            r = await http.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4, "ignore_eos": True})
            assert r.json()["usage"]["completion_tokens"] == 4
    finally:
        await srv.stop()
    assert srv.runner.engine.scheduler.counters.finished == 1


async def test_streamed_completion_chunks_are_openai_shaped_json() -> None:
    import json

    import httpx

    from ops.servers import free_port
    from services.engine_server.server import EmbeddedServer, ServerOptions

    srv = EmbeddedServer(ServerOptions(port=free_port(), num_gpu_blocks=50, speedup=100.0))
    await srv.start()
    try:
        async with httpx.AsyncClient(base_url=srv.url) as http:
            body = {"prompt": 'quote " and \\ backslash', "max_tokens": 5, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            async with http.stream("POST", "/v1/completions", json=body) as r:
                lines = [ln[6:] async for ln in r.aiter_lines() if ln.startswith("data: ")]
    finally:
        await srv.stop()
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x) for x in lines[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert len("".join(texts).split()) == 5
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_long_prompts_are_tokenized_without_holding_up_the_event_loop() -> None:
    import time

    tm = TextModel()
    text = "the quick brown fox jumps over the lazy dog " * 3000
    assert tm.encode_off_gil(text) == tm.encode(text)
    gaps: list[float] = []

    async def ticker() -> None:
        for _ in range(50):
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            gaps.append(time.perf_counter() - t)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.005)
    t0 = time.perf_counter()
    await asyncio.to_thread(tm.encode_off_gil, text)
    took = time.perf_counter() - t0
    await task
    assert max(gaps) < took / 2  # the loop kept ticking while the thread tokenized


async def test_the_cache_snapshot_covers_the_kv_events_not_yet_published_and_numbers_the_next_one() -> None:
    from services.engine_server.publisher import Publisher
    from shared.core.kv_events import chain_hashes

    engine = Engine(SchedulerConfig(num_gpu_blocks=100, enable_kv_events=True), MODEL, fast_forward=False)
    runner = EngineRunner(engine, speedup=50.0)
    pub = Publisher(runner, "nats://127.0.0.1:1", "e1", "m", "http://127.0.0.1:1")

    def fan_out() -> None:
        batch = engine.take_kv_events()
        if batch is not None:
            pub.queue_kv(batch)

    pub.flush_kv = fan_out
    runner.start()
    sink = CollectSink()
    runner.submit(Request("r0", list(range(64)), max_tokens=2, ignore_eos=True), sink)
    await asyncio.wait_for(sink.done, 5)
    await runner.stop()
    pub.kv_seq = 5  # five messages already published
    snap = pub.kv_snapshot("n" * 32)
    assert set(chain_hashes(list(range(64)), engine.scheduler.config.block_size)) <= set(snap.block_hashes)
    assert snap.next_seq == 5 + len(pub.kv) and len(pub.kv) >= 1  # the queued (unpublished) messages are in it
    assert snap.total == len(snap.block_hashes) and snap.nonce == "n" * 32


def test_a_step_batch_past_the_followers_bound_is_queued_as_several_messages_in_order() -> None:
    from services.engine_server.publisher import Publisher
    from shared.bus.messages import EngineKVEvents, decode, encode
    from shared.core.kv_events import MAX_BATCH_BLOCKS, BlockRemoved, KVEventBatch

    engine = Engine(SchedulerConfig(num_gpu_blocks=100, enable_kv_events=True), MODEL, fast_forward=False)
    pub = Publisher(EngineRunner(engine, speedup=50.0), "nats://127.0.0.1:1", "e1", "m", "http://127.0.0.1:1")
    hashes = list(range(MAX_BATCH_BLOCKS + 10))  # a long fast-forward's events, say
    pub.queue_kv(KVEventBatch(ts=1.0, events=[BlockRemoved(block_hashes=hashes)]))
    sent = [decode(encode(EngineKVEvents(instance_id="e1", model="m", seq=n, batch=b)), EngineKVEvents)
            for n, b in enumerate(pub.kv)]  # each one a message its followers take
    assert [h for m in sent for e in m.batch.events for h in e.block_hashes] == hashes  # type: ignore[union-attr]
    assert len(sent) == 2


async def test_an_idle_prefill_server_frees_its_last_hand_offs_blocks_once_sent() -> None:
    # the runner went idle with the hand-off's blocks held: the reported KV usage stayed up until a request came
    from shared.core.engine import KVLink
    from shared.core.roles import NodeRole

    link = KVLink(bandwidth_bytes_s=1e9, latency_s=0.05)
    engine = Engine(SchedulerConfig(num_gpu_blocks=100, role=NodeRole.PREFILL), MODEL, fast_forward=False,
                    kv_link=link, kv_bytes_per_token=1000)
    runner = EngineRunner(engine, speedup=1.0)
    runner.start()
    sink = CollectSink()
    runner.submit(Request("p", [1] * 64, max_tokens=10), sink)
    await asyncio.wait_for(sink.done, 5)
    held = engine.scheduler.kv.num_used
    assert held > 0  # still sending
    for _ in range(100):  # the transfer takes ~50 ms
        if engine.scheduler.kv.num_used == 0:
            break
        await asyncio.sleep(0.01)
    await runner.stop()
    assert engine.scheduler.kv.num_used == 0 and not engine.scheduler.sending
