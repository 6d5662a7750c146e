"""Assembles and runs the emulated model server (engine + runner + HTTP + NATS publisher)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from services.engine_server.api import ServerInfo, create_app
from services.engine_server.publisher import publish_loop
from services.engine_server.runner import EngineRunner
from services.engine_server.sse import TRANSPORT_KEY
from services.engine_server.textgen import TextModel
from shared.assets.tokenizer import TOKENIZER_DIR
from shared.catalog import load_gpu_spec, load_model_arch
from shared.core.engine import Engine, RooflineStepTime, SchedulerConfig
from shared.core.engine.step_time import RooflineParams


def set_nodelay(transport: asyncio.BaseTransport) -> bool:
    """Disable Nagle's algorithm on a transport's TCP socket; False if it has none (e.g. a Unix socket)."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return True
    return False


class NoDelayH11Protocol(H11Protocol):
    """HTTP/1.1 protocol that disables Nagle on every connection, so streamed tokens leave at once, and hands
    the connection's transport to the app (scope extension :data:`TRANSPORT_KEY`) so token streams can write
    their chunks directly, one write per stream per engine step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        inner = self.app

        async def with_transport(scope: Scope, receive: Receive, send: Send) -> None:
            scope.setdefault("extensions", {})[TRANSPORT_KEY] = self.transport
            await inner(scope, receive, send)

        self.app = with_transport

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        set_nodelay(transport)
        super().connection_made(transport)


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """Everything ``python -m services.engine_server`` accepts."""

    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "llama-3.1-8b"
    served_model_name: str | None = None
    gpu: str = "H100-SXM-80GB"
    tp: int = 1
    speedup: float = 1.0
    block_size: int = 16
    num_gpu_blocks: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    policy: str = "fcfs"
    mean_output_len: int = 128
    nats_url: str | None = None
    instance_id: str = "engine-0"
    metrics_interval_s: float = 0.075
    gpu_mem_util: float = 0.9


def build_engine(opts: ServerOptions, *, fast_forward: bool = False) -> Engine:
    """The engine ``opts`` describe (the server's, or a virtual-time twin of it for benchmarks)."""
    arch, gpu = load_model_arch(opts.model), load_gpu_spec(opts.gpu)
    step = RooflineStepTime(arch, gpu, tp=opts.tp, params=RooflineParams(gpu_mem_utilization=opts.gpu_mem_util))
    blocks = opts.num_gpu_blocks or step.kv_capacity_blocks(opts.block_size) + 1
    if blocks < 2:
        raise ValueError(f"{arch.key} does not fit on {opts.tp}x {gpu.key}: no memory left for the KV cache")
    max_len = opts.max_model_len or min(arch.max_position_embeddings or 1 << 30, (blocks - 1) * opts.block_size)
    cfg = SchedulerConfig(
        block_size=opts.block_size, num_gpu_blocks=blocks, max_num_seqs=opts.max_num_seqs,
        max_num_batched_tokens=opts.max_num_batched_tokens, enable_prefix_caching=opts.enable_prefix_caching,
        policy=opts.policy,  # type: ignore[arg-type]
        max_model_len=max_len,
    )
    return Engine(cfg, step, fast_forward=fast_forward)


def build(opts: ServerOptions) -> tuple[FastAPI, EngineRunner]:
    """Engine, runner and app for ``opts`` (the runner starts with the app's lifespan)."""
    arch, gpu = load_model_arch(opts.model), load_gpu_spec(opts.gpu)
    engine = build_engine(opts)
    max_len = engine.scheduler.config.model_len_limit
    runner = EngineRunner(engine, speedup=opts.speedup)
    name = opts.served_model_name or arch.key
    url = f"http://{opts.host}:{opts.port}"
    info = ServerInfo(served_model_name=name, model_path=str(TOKENIZER_DIR), catalog_model=arch.key,
                      gpu=gpu.key, tp=opts.tp, speedup=opts.speedup, max_model_len=max_len, url=url,
                      created=int(time.time()))
    app = create_app(runner, TextModel(opts.mean_output_len), info)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        runner.t0 = runner.clock()
        runner.start()
        pub = None
        if opts.nats_url:
            pub = asyncio.create_task(
                publish_loop(runner, opts.nats_url, opts.instance_id, name, url, opts.metrics_interval_s)
            )
        try:
            yield
        finally:
            if pub is not None:
                pub.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pub
            await runner.stop()
            app.state.writer.close()

    app.router.lifespan_context = lifespan
    return app, runner


def _uvicorn_config(app: FastAPI, opts: ServerOptions) -> uvicorn.Config:
    return uvicorn.Config(app, host=opts.host, port=opts.port, http=NoDelayH11Protocol, log_level="warning",
                          lifespan="on")


def serve(opts: ServerOptions) -> None:
    """Run the server until interrupted."""
    app, _ = build(opts)
    uvicorn.Server(_uvicorn_config(app, opts)).run()


class EmbeddedServer:
    """A server running as a task in the caller's event loop (e.g. one per instance of an emulated worker)."""

    def __init__(self, opts: ServerOptions) -> None:
        app, self.runner = build(opts)
        self.url = f"http://{opts.host}:{opts.port}"
        self._server = uvicorn.Server(_uvicorn_config(app, opts))
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout_s: float = 10.0) -> None:
        """Start serving; returns once the socket accepts connections."""
        self._task = asyncio.create_task(self._server.serve())
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self._server.started:
            if self._task.done():
                self._task.result()  # re-raise why it could not start
                raise RuntimeError(f"engine server at {self.url} stopped during start-up")
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"engine server at {self.url} did not start within {timeout_s} s")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """Stop serving (open streams are closed) and wait for the task."""
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._task = None


def parse_args(argv: list[str] | None = None) -> ServerOptions:
    """Command-line options."""
    d = ServerOptions()
    p = argparse.ArgumentParser(prog="python -m services.engine_server",
                                description="Emulated OpenAI-compatible model server (no GPU).")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--model", default=d.model, help="catalogue model to emulate (e.g. llama-3.1-8b)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--gpu", default=d.gpu, help="GPU to emulate (e.g. H100-SXM-80GB)")
    p.add_argument("--tp", type=int, default=d.tp, help="tensor-parallel GPUs")
    p.add_argument("--speedup", type=float, default=d.speedup, help="run this many times faster than real time")
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--num-gpu-blocks", type=int, default=None, help="override the computed KV capacity")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--policy", choices=["fcfs", "priority"], default=d.policy)
    p.add_argument("--mean-output-len", type=int, default=d.mean_output_len,
                   help="mean natural output length (tokens) before EOS when ignore_eos is off")
    p.add_argument("--nats-url", default=None, help="publish EngineMetrics on this NATS server")
    p.add_argument("--instance-id", default=d.instance_id)
    p.add_argument("--metrics-interval", type=float, default=d.metrics_interval_s, help="seconds between pushes")
    a = p.parse_args(argv)
    if a.speedup <= 0:
        p.error("--speedup must be > 0")
    return ServerOptions(
        host=a.host, port=a.port, model=a.model, served_model_name=a.served_model_name, gpu=a.gpu, tp=a.tp,
        speedup=a.speedup, block_size=a.block_size, num_gpu_blocks=a.num_gpu_blocks, max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens, max_model_len=a.max_model_len,
        enable_prefix_caching=not a.no_prefix_caching, policy=a.policy, mean_output_len=a.mean_output_len,
        nats_url=a.nats_url, instance_id=a.instance_id, metrics_interval_s=a.metrics_interval,
    )
