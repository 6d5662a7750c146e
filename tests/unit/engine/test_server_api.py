"""What clients and routers expect of a vLLM server, checked with the openai SDK against an embedded server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from ops.servers import free_port
from services.engine_server.server import EmbeddedServer, ServerOptions, parse_args


@pytest.fixture
async def server() -> AsyncIterator[EmbeddedServer]:
    srv = EmbeddedServer(ServerOptions(port=free_port(), num_gpu_blocks=200, speedup=100.0,
                                       served_model_name="my-model", max_loras=1, lora_modules=("sql", "chat")))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


def _client(srv: EmbeddedServer) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)


async def test_an_unknown_model_is_a_404(server: EmbeddedServer) -> None:
    with pytest.raises(openai.NotFoundError, match="The model `gpt-9` does not exist"):
        await _client(server).completions.create(model="gpt-9", prompt="hi", max_tokens=2)


async def test_responses_name_the_served_model_and_models_lists_it_with_its_adapters(server: EmbeddedServer) -> None:
    client = _client(server)
    ids = [m.id async for m in client.models.list()]
    assert ids == ["my-model", "sql", "chat"]
    r = await client.completions.create(model="my-model", prompt="hi", max_tokens=3, extra_body={"ignore_eos": True})
    assert r.model == "my-model" and r.usage is not None and r.usage.completion_tokens == 3


async def test_a_request_for_an_adapter_runs_on_it(server: EmbeddedServer) -> None:
    r = await _client(server).chat.completions.create(model="sql", messages=[{"role": "user", "content": "q"}],
                                                      max_tokens=2, extra_body={"ignore_eos": True})
    assert r.model == "sql"
    assert server.runner.engine.scheduler.lora_stats().loaded == ["sql"]


@pytest.mark.parametrize(("extra", "message"), [
    ({"n": 2}, "n > 1"),
    ({"best_of": 3}, "best_of > 1"),
    ({"logprobs": 2}, "logprobs are not supported"),
    ({"echo": True}, "echo is not supported"),
])
async def test_unsupported_sampling_options_are_refused_with_a_400(
    server: EmbeddedServer, extra: dict[str, object], message: str
) -> None:
    with pytest.raises(openai.BadRequestError, match=message):
        await _client(server).completions.create(model="my-model", prompt="hi", max_tokens=2,
                                                 **extra)  # type: ignore[call-overload]


async def test_chat_logprobs_are_refused_and_false_is_fine(server: EmbeddedServer) -> None:
    client = _client(server)
    msgs = [{"role": "user", "content": "q"}]
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        await client.chat.completions.create(model="my-model", messages=msgs, max_tokens=2,  # type: ignore[arg-type]
                                             logprobs=True)
    r = await client.chat.completions.create(model="my-model", messages=msgs, max_tokens=2,  # type: ignore[arg-type]
                                             logprobs=False)
    assert r.choices[0].finish_reason in ("length", "stop")


async def test_the_server_logs_a_startup_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gantry.engine_server"):
        srv = EmbeddedServer(ServerOptions(port=free_port(), num_gpu_blocks=50, served_model_name="m1"))
        await srv.start()
        await srv.stop()
    line = next(r.getMessage() for r in caplog.records if "serving" in r.getMessage())
    assert "'m1'" in line and srv.url in line and "50 KV blocks" in line


def test_lora_modules_take_vllm_name_equals_path_form() -> None:
    opts = parse_args(["--max-loras", "2", "--lora-modules", "a=/x/a", "b", "a=/y"])
    assert opts.lora_modules == ("a", "b") and opts.max_loras == 2


def test_lora_modules_without_max_loras_is_an_error() -> None:
    from services.engine_server.server import build_engine

    with pytest.raises(ValueError, match="max-loras"):
        build_engine(ServerOptions(lora_modules=("a",), num_gpu_blocks=50))


async def test_kv_events_on_zmq_use_vllms_three_frame_wire_format() -> None:
    zmq_asyncio = pytest.importorskip("zmq.asyncio")
    import zmq

    from shared.core.kv_events import BlockStored, chain_hashes, decode_batch

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    srv = EmbeddedServer(ServerOptions(port=free_port(), num_gpu_blocks=100, speedup=50.0, kv_events_zmq=endpoint,
                                       kv_events_topic="kv@test", access_log=False))
    await srv.start()
    ctx = zmq_asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    try:
        sub.connect(endpoint)
        sub.setsockopt(zmq.SUBSCRIBE, b"kv@test")
        await asyncio.sleep(0.3)  # a PUB socket drops what it sends before the subscription arrives
        prompt = list(range(100, 148))
        async with httpx.AsyncClient(base_url=srv.url) as http:
            r = await http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "ignore_eos": True})
            assert r.status_code == 200
        topic, seq, payload = await asyncio.wait_for(sub.recv_multipart(), 5)
    finally:
        sub.close()
        ctx.term()
        await srv.stop()
    assert topic == b"kv@test" and int.from_bytes(seq, "big") == 0 and len(seq) == 8
    stored = [e for e in decode_batch(payload).events if isinstance(e, BlockStored)]
    assert stored[0].block_hashes[:3] == chain_hashes(prompt, 16)


async def test_kv_transfer_params_are_ignored_by_a_mixed_server_and_refused_by_a_prefill_one() -> None:
    body = {"prompt": [3] * 40, "max_tokens": 3, "ignore_eos": True,
            "kv_transfer_params": {"do_remote_prefill": True, "num_bytes": 1}}
    for role, status in (("mixed", 200), ("prefill", 400)):
        srv = EmbeddedServer(ServerOptions(port=free_port(), num_gpu_blocks=100, speedup=50.0, role=role,
                                           access_log=False))
        await srv.start()
        try:
            async with httpx.AsyncClient(base_url=srv.url) as http:
                r = await http.post("/v1/completions", json=body)
        finally:
            await srv.stop()
        assert r.status_code == status, role
        if status == 200:
            assert r.json()["usage"]["completion_tokens"] == 3 and "kv_transfer_params" not in r.json()
        else:
            assert "prefill-only" in r.json()["error"]["message"]
