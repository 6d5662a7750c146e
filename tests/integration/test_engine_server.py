"""The emulated model server, as a real process: an OpenAI client streams from it, its metrics move
under load (HTTP /metrics and the NATS EngineMetrics push)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import pytest
from nats.aio.msg import Msg
from openai import AsyncOpenAI
from tokenizers import Tokenizer

from ops.servers import ServerProcess, free_port
from shared.bus import subjects
from shared.bus.messages import EngineMetrics, decode
from shared.envsettings import ENGINE_NATS_URL_ENV

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def engine_server(nats_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("engine") / "server.log"
    args = [
        sys.executable, "-m", "services.engine_server", "--port", str(port), "--speedup", "2",
        "--max-num-seqs", "4", "--num-gpu-blocks", "200",
        "--instance-id", "it-engine", "--metrics-interval", "0.05",
    ]
    with log.open("wb") as fh:  # the URL holds a secret: through the environment, as the fleet passes it
        proc = subprocess.Popen(args, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, ENGINE_NATS_URL_ENV: nats_server.url})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90  # a loaded host starts a Python server slowly
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=0.5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "engine server did not come up"
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


def _gauge(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


async def test_openai_client_streams_a_chat_completion_counted_by_the_shipped_tokenizer(engine_server: str) -> None:
    async with httpx.AsyncClient() as http:
        model_path = (await http.get(f"{engine_server}/server_info")).json()["model_path"]
    client = AsyncOpenAI(base_url=f"{engine_server}/v1", api_key="none")
    stream = await client.chat.completions.create(
        model="llama-3.1-8b-instruct",
        messages=[{"role": "user", "content": "Say something about the cluster."}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    pieces, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.choices:
            if chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert len(pieces) == 12
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 12
    tok = Tokenizer.from_file(str(Path(model_path) / "tokenizer.json"))  # loadable offline by clients
    assert len(tok.encode("".join(pieces)).ids) == usage.completion_tokens


async def test_metrics_show_running_waiting_and_kv_usage_move_under_load(
    engine_server: str, nats_server: ServerProcess
) -> None:
    nc = await nats.connect(nats_server.url)
    pushed: list[EngineMetrics] = []

    async def on_msg(msg: Msg) -> None:
        pushed.append(decode(msg.data, EngineMetrics))

    await nc.subscribe(subjects.engine_metrics("it-engine"), cb=on_msg)
    client = AsyncOpenAI(base_url=f"{engine_server}/v1", api_key="none")

    async def one(i: int) -> int:
        r = await client.completions.create(model="llama-3.1-8b-instruct", prompt=f"request {i} " * 40, max_tokens=120,
                                            extra_body={"ignore_eos": True})
        assert r.usage is not None
        return r.usage.completion_tokens

    samples: list[tuple[float, float, float]] = []
    async with httpx.AsyncClient() as http:
        load = asyncio.gather(*(one(i) for i in range(12)))
        while not load.done() and len(samples) < 400:
            text = (await http.get(f"{engine_server}/metrics")).text
            samples.append((_gauge(text, "vllm:num_requests_running"), _gauge(text, "vllm:num_requests_waiting"),
                            _gauge(text, "vllm:kv_cache_usage_perc")))
            await asyncio.sleep(0.05)
        assert await load == [120] * 12
        await asyncio.sleep(0.2)
        after = (await http.get(f"{engine_server}/metrics")).text
    await nc.drain()

    assert max(s[0] for s in samples) == 4, "running rises to max_num_seqs"
    assert max(s[1] for s in samples) >= 6, "the rest wait"
    assert max(s[2] for s in samples) > 0.1, "the KV cache fills"
    assert (_gauge(after, "vllm:num_requests_running"), _gauge(after, "vllm:num_requests_waiting"),
            _gauge(after, "vllm:kv_cache_usage_perc")) == (0, 0, 0)
    assert "vllm:time_to_first_token_seconds_count" in after
    assert max(m.num_requests_running for m in pushed) == 4
    assert max(m.num_requests_waiting for m in pushed) >= 6
    assert max(m.kv_cache_usage_perc for m in pushed) > 0.1
    assert pushed[-1].num_gpu_blocks == 200 and pushed[-1].block_size == 16
