"""What clients and routers expect of a vLLM server, checked with the openai SDK against an embedded server."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

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


@pytest.mark.parametrize("window", ["nan", "inf", "-1"])
def test_a_kv_snapshot_window_that_is_not_a_finite_duration_is_refused_in_one_line(
    window: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as refused:
        parse_args(["--kv-snapshot-window", window])
    assert refused.value.code == 2
    assert "--kv-snapshot-window is a finite duration in seconds" in capsys.readouterr().err


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


def _count_short_way(app: Any) -> list[str]:
    """Record each request the short way hands to an endpoint (FastAPI calls the endpoints unwrapped)."""
    calls: list[str] = []
    for path, (model, endpoint) in list(app.fast_routes.items()):
        async def counted(body: Any, endpoint: Any = endpoint, path: str = path) -> Any:
            calls.append(path)
            return await endpoint(body)
        app.fast_routes[path] = (model, counted)
    return calls


_BAD_BODIES: list[tuple[str, str, bytes, str, str]] = [
    # (path, content type, body, what the 400 names, case)
    ("/v1/completions", "application/json", b'{"prompt": [1, 2', "not valid JSON", "truncated JSON"),
    ("/v1/completions", "application/json", b'{"prompt": [1, 2], "max_tokens": 0}', "max_tokens", "max_tokens 0"),
    ("/v1/completions", "application/json", b'{"max_tokens": 3}', "prompt: Field required", "no prompt"),
    ("/v1/completions", "application/json", b'{"prompt": {"a": 1}}', "prompt", "prompt of the wrong type"),
    ("/v1/completions", "application/json", b'[1, 2, 3]', "valid dictionary", "not an object"),
    ("/v1/completions", "application/json", b"\xff\xfe{", "error parsing the body", "not UTF-8"),
    ("/v1/completions", "text/plain", b'{"prompt": [1, 2], "max_tokens": 2}', "valid dictionary", "not JSON typed"),
    ("/v1/chat/completions", "application/json", b'{"messages": []}', "messages", "no messages"),
    ("/v1/chat/completions", "application/json", b'{"messages": [{"content": "x"}]}', "role", "message without role"),
]


@pytest.mark.parametrize(("path", "ctype", "body", "names", "case"), _BAD_BODIES, ids=[b[-1] for b in _BAD_BODIES])
async def test_a_bad_generation_request_gets_the_same_clear_400_as_through_fastapi(
    path: str, ctype: str, body: bytes, names: str, case: str
) -> None:
    from fastapi import FastAPI

    from services.engine_server.server import build

    app, runner = build(ServerOptions(num_gpu_blocks=50, speedup=50.0))
    short_way = _count_short_way(app)
    runner.start()
    try:
        async def post(asgi: Any) -> httpx.Response:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://t") as http:
                return await http.post(path, content=body, headers={"content-type": ctype})

        got = await post(app)
        fastapi_only = await post(lambda s, r, snd: FastAPI.__call__(app, s, r, snd))  # the short way skipped
    finally:
        await runner.stop()
        app.state.writer.close()
    assert got.status_code == 400 and short_way == [], case
    assert got.json() == fastapi_only.json(), case
    said = got.json()
    assert names in (said["error"]["message"] if "error" in said else said["detail"]), case


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_valid_generation_requests_answer_alike_by_the_short_way_and_through_fastapi(
    path: str, stream: bool
) -> None:
    from fastapi import FastAPI

    from services.engine_server.server import build

    app, runner = build(ServerOptions(num_gpu_blocks=50, speedup=50.0, served_model_name="m",
                                      enable_prefix_caching=False))  # the second request must not hit the cache
    body: dict[str, Any] = {"max_tokens": 4, "ignore_eos": True, "stream": stream, "model": "m",
                            "stream_options": {"include_usage": True} if stream else None}
    body |= {"messages": [{"role": "user", "content": "hi there"}]} if "chat" in path else {"prompt": "hi there"}
    short_way = _count_short_way(app)
    runner.start()
    try:
        async def post(asgi: Any) -> httpx.Response:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://t") as http:
                return await http.post(path, json=body)

        got = await post(app)
        fastapi_only = await post(lambda s, r, snd: FastAPI.__call__(app, s, r, snd))
    finally:
        await runner.stop()
        app.state.writer.close()
    assert got.status_code == fastapi_only.status_code == 200
    assert short_way == [path]  # the first went the short way, the second through FastAPI
    assert got.headers["content-type"] == fastapi_only.headers["content-type"]

    def shape(r: httpx.Response) -> Any:
        """The answer without its id and creation time."""
        if not stream:
            return {k: v for k, v in r.json().items() if k not in ("id", "created")}
        events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
        return [e if e == "[DONE]" else {k: v for k, v in json.loads(e).items() if k not in ("id", "created")}
                for e in events]

    a, b = shape(got), shape(fastapi_only)
    if stream:
        assert len(a) == len(b) and a[-1] == b[-1] == "[DONE]"
        assert [e["choices"][0]["finish_reason"] if e["choices"] else None for e in a[:-1]] == \
            [e["choices"][0]["finish_reason"] if e["choices"] else None for e in b[:-1]]
        assert a[-2]["usage"] == b[-2]["usage"]
    else:
        assert a.keys() == b.keys() and a["usage"] == b["usage"] and a["model"] == b["model"] == "m"
        assert a["choices"][0]["finish_reason"] == b["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("flag", ["--speedup", "--kv-link-gbps", "--kv-link-latency", "--lora-load-time"])
@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_a_rate_or_duration_that_is_not_finite_and_in_range_is_refused_in_one_line(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as refused:
        parse_args([flag, value])
    assert refused.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # argparse's usage, then the error line
    assert flag in last and "must be" in last and "finite" in last
