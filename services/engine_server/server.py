"""Assembles and runs the emulated model server (engine + runner + HTTP + NATS publisher)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from prometheus_client.registry import Collector
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from services.engine_server.access_log import log_config
from services.engine_server.api import ServerInfo, create_app, error_body
from services.engine_server.kv_replay import MAX_REPLAY_BUFFER_BATCHES, REPLAY_BUFFER_BATCHES, ReplayBuffer, ReplayDesk
from services.engine_server.prometheus import PublisherCollector, RequestLogCollector, ZmqPublisherCollector
from services.engine_server.publisher import SNAPSHOT_WINDOW_S, Publisher
from services.engine_server.request_log import RequestLog, open_request_log
from services.engine_server.runner import EngineRunner
from services.engine_server.sse import TRANSPORT_KEY
from services.engine_server.textgen import TextModel
from services.engine_server.zmq_events import ZmqKVPublisher
from services.engine_server.zmq_replay import ZmqReplayServer
from shared.assets.tokenizer import TOKENIZER_DIR
from shared.catalog import load_gpu_spec, load_model_arch
from shared.core.engine import Engine, KVLink, RooflineStepTime, SchedulerConfig
from shared.core.engine.step_time import RooflineParams
from shared.core.roles import NodeRole
from shared.envsettings import ENGINE_NATS_URL_ENV, credentials_on_command_line, without_user
from shared.host.report_auth import REPORT_KEY_ENV, parse_key
from shared.host.tasks import cancel_until_done

log = logging.getLogger("gantry.engine_server")


def set_nodelay(transport: asyncio.BaseTransport) -> bool:
    """Disable Nagle's algorithm on a transport's TCP socket; False if it has none (e.g. a Unix socket)."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return True
    return False


def _with_transport(protocol: Any) -> None:
    """Wrap ``protocol.app`` so each request's scope carries the connection's transport (:data:`TRANSPORT_KEY`)."""
    inner = protocol.app

    async def with_transport(scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault("extensions", {})[TRANSPORT_KEY] = protocol.transport
        await inner(scope, receive, send)

    protocol.app = with_transport


class _EngineIntake(asyncio.Protocol):
    """What the server adds to either uvicorn HTTP/1.1 protocol (mixed in before it): TCP_NODELAY on every
    connection, so streamed tokens leave at once; the connection's transport in each request's scope
    (:data:`TRANSPORT_KEY`), so token streams write their chunks directly, one write per stream per engine step;
    and ``reading_since``, the monotonic time a request (or a new connection's first) began arriving, None while
    none is outstanding: :class:`QuietServer` closes a connection whose request is not whole within
    ``REQUEST_READ_TIMEOUT_S`` of it (``close_stalled``; time the server itself paused reading, by flow control,
    does not count). Each protocol says when a request begins and ends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _with_transport(self)
        self.reading_since: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        set_nodelay(transport)
        super().connection_made(transport)
        self.reading_since = time.monotonic()  # a connection owes its first request


class NoDelayH11Protocol(_EngineIntake, H11Protocol):
    """HTTP/1.1 on h11 (the fallback without httptools) with the server's intake (:class:`_EngineIntake`)."""

    def handle_events(self) -> None:
        """Parse what arrived (uvicorn's), then note whether a request is still arriving: one is while the peer
        is mid-request (its head partly buffered, or its body arriving); none once it is whole (or refused)."""
        super().handle_events()
        state = self.conn.their_state
        if state is h11.SEND_BODY or (state is h11.IDLE and self.conn.trailing_data[0]):
            if self.reading_since is None:
                self.reading_since = time.monotonic()
        elif state is not h11.IDLE:
            self.reading_since = None


MAX_HEAD_BYTES = 64 << 10
"""Request line and headers (431 beyond): uvicorn's httptools protocol sets no bound, so one endless header
grew without limit (h11's own bound is 16 KiB; Envoy's default 60 KiB)."""
REQUEST_READ_TIMEOUT_S = 30.0
"""Seconds a connection may take to deliver one whole request (head and body) before it is closed: uvicorn
times out idle connections only after a response, so one that connected and sent nothing, or sent a request
a byte at a time, was held for ever."""
_REFUSED = b"HTTP/1.1 %d %b\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%b"


def _http_protocol() -> type[asyncio.Protocol]:
    """The httptools-based protocol when httptools is installed (its C parser takes a request in for less CPU
    than h11), else the h11 one; both with the server's intake (:class:`_EngineIntake`: TCP_NODELAY, the
    transport in the scope, a request held to ``REQUEST_READ_TIMEOUT_S``). The httptools one also bounds a
    request's head (``MAX_HEAD_BYTES``; h11 has its own bound)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return NoDelayH11Protocol

    class NoDelayHttpToolsProtocol(_EngineIntake, HttpToolsProtocol):
        """HTTP/1.1 on httptools with the server's intake (:class:`_EngineIntake`) and the head bound above."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.head_bytes = 0  # bytes received since the current request's head began, while it is open
            self.head_open = True

        def data_received(self, data: bytes) -> None:
            if self.head_open:
                seen = self.head_bytes + len(data)
                # past the bound only if the head does not end within it (this read may carry a large body)
                if seen > MAX_HEAD_BYTES and data.find(b"\r\n\r\n", 0, max(MAX_HEAD_BYTES - self.head_bytes, 0)
                                                       + 4) < 0:
                    self._head_too_large()
                    return
                self.head_bytes = seen
            super().data_received(data)

        def _head_too_large(self) -> None:
            self._refuse(431, f"request head larger than {MAX_HEAD_BYTES} bytes")

        def send_400_response(self, msg: str) -> None:
            """What the parser cannot frame (lengths that disagree or are negative, bad chunk sizes, not HTTP):
            a 400 in the OpenAI error shape, as every other refusal (uvicorn's is plain text), then close."""
            self._refuse(400, msg)

        def _refuse(self, code: int, message: str) -> None:
            body = json.dumps(error_body(code, message)).encode()  # (a 431's type names it, as the API's errors)
            self.transport.write(_REFUSED % (code, HTTPStatus(code).phrase.encode(), len(body), body))
            self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self.reading_since is None:
                self.reading_since = time.monotonic()

        def on_headers_complete(self) -> None:
            self.head_open, self.head_bytes = False, 0
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self.head_open, self.reading_since = True, None
            super().on_message_complete()

    return NoDelayHttpToolsProtocol


def close_stalled(connections: Iterable[Any], now: float, timeout_s: float) -> int:
    """Close the connections that began a request (or connected) more than ``timeout_s`` before ``now`` and
    have not delivered it whole; returns how many.

    Only the client's delay counts: while the server itself has paused reading a connection (uvicorn's flow
    control, once more than 64 KiB of body waits for an app that has not taken it in, or a pipelined request
    waits for the answer before it), the client cannot send, so its clock restarts at each sweep until reading
    resumes (an honest client sending a large body to a slow app was cut off)."""
    closed = 0
    for conn in connections:
        if getattr(conn, "reading_since", None) is None:
            continue
        transport = getattr(conn, "transport", None)
        if transport is None or transport.is_closing():
            continue
        if not transport.is_reading():
            conn.reading_since = now
        elif now - conn.reading_since > timeout_s:
            transport.close()
            closed += 1
    return closed


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
    report_key: bytes | None = None  # this instance's own report key (from the environment): reports are signed
    metrics_interval_s: float = 0.075
    kv_snapshot_window_s: float = SNAPSHOT_WINDOW_S  # at most one batch of prefix-cache snapshot answers per window
    gpu_mem_util: float = 0.9
    max_loras: int = 0
    max_cpu_loras: int | None = None
    lora_modules: tuple[str, ...] = ()
    lora_load_s: float = 0.05
    role: str = "mixed"  # prefill | decode | mixed (P/D disaggregation)
    kv_link_gbps: float = 400.0  # KV transfer link between prefill and decode engines, Gbit/s
    kv_link_latency_s: float = 0.0
    kv_events: bool = True  # publish KV-cache events (with a NATS URL)
    kv_events_zmq: str | None = None  # also on a ZMQ PUB socket bound here (vLLM's wire format)
    kv_events_topic: str = ""
    kv_events_replay_endpoint: str | None = None  # a ZMQ ROUTER bound here replays kept batches (vLLM's protocol)
    kv_events_replay_buffer: int = REPLAY_BUFFER_BATCHES  # batches kept for replay (vLLM's buffer_steps)
    access_log: bool = True
    request_log: str | None = None  # append one JSON line of exact timings per ended request here
    # chaos: answer every generation with a 500 while reports, KV events and /metrics go on (an engine whose model
    # broke but whose process lives: what routing must stop sending to)
    fail_generations: bool = False
    request_log_fd: int | None = None  # that file, already open (the command line opens it to check it)
    request_read_timeout_s: float = REQUEST_READ_TIMEOUT_S  # a request must arrive whole within this


def build_engine(opts: ServerOptions, *, fast_forward: bool = False) -> Engine:
    """The engine ``opts`` describe (the server's, or a virtual-time twin of it for benchmarks)."""
    arch, gpu = load_model_arch(opts.model), load_gpu_spec(opts.gpu)
    step = RooflineStepTime(arch, gpu, tp=opts.tp, params=RooflineParams(gpu_mem_utilization=opts.gpu_mem_util))
    blocks = opts.num_gpu_blocks or step.kv_capacity_blocks(opts.block_size) + 1
    if blocks < 2:
        raise ValueError(f"{arch.key} does not fit on {opts.tp}x {gpu.key}: no memory left for the KV cache")
    max_len = opts.max_model_len or min(arch.max_position_embeddings or 1 << 30, (blocks - 1) * opts.block_size)
    if opts.lora_modules and opts.max_loras < 1:
        raise ValueError("--lora-modules needs --max-loras >= 1")
    cfg = SchedulerConfig(
        block_size=opts.block_size, num_gpu_blocks=blocks, max_num_seqs=opts.max_num_seqs,
        max_num_batched_tokens=opts.max_num_batched_tokens, enable_prefix_caching=opts.enable_prefix_caching,
        policy=opts.policy,  # type: ignore[arg-type]
        max_model_len=max_len,
        enable_kv_events=(opts.kv_events and opts.nats_url is not None) or opts.kv_events_zmq is not None,
        max_loras=opts.max_loras, max_cpu_loras=opts.max_cpu_loras, role=NodeRole(opts.role),
    )
    link = KVLink(opts.kv_link_gbps * 1e9 / 8, opts.kv_link_latency_s) if opts.role != "mixed" else None
    return Engine(cfg, step, fast_forward=fast_forward, lora_load_s=opts.lora_load_s, kv_link=link)


def startup_line(opts: ServerOptions, info: ServerInfo, engine: Engine) -> str:
    """What the server says when it is up (one line, as vLLM's "Starting vLLM API server ... on ...")."""
    cfg = engine.scheduler.config
    extra = ""
    if opts.max_loras:
        extra += f", max_loras {opts.max_loras}, adapters [{', '.join(opts.lora_modules)}]"
    if opts.role != "mixed":
        extra += f", P/D role {opts.role}, KV link {opts.kv_link_gbps:g} Gbit/s"
    return (f"Gantry emulated model server {info.instance_id}: serving {info.served_model_name!r} (emulating "
            f"{info.catalog_model} on {opts.tp}x {info.gpu}, speedup {opts.speedup:g}) at {info.url}; "
            f"{cfg.num_gpu_blocks} KV blocks of {cfg.block_size} tokens, max_model_len {info.max_model_len}, "
            f"max_num_seqs {cfg.max_num_seqs}{extra}"
            + (f"; publishing on NATS {without_user(opts.nats_url)}" if opts.nats_url else ""))


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
                      created=int(time.time()), lora_modules=opts.lora_modules, instance_id=opts.instance_id,
                      vocab_size=arch.vocab_size)
    pub = Publisher(runner, opts.nats_url, opts.instance_id, name, url, opts.metrics_interval_s,
                    report_key=opts.report_key, snapshot_window_s=opts.kv_snapshot_window_s) if opts.nats_url else None
    zmq_pub, replay = _zmq_kv_events(opts)
    # what the publishers drop shows on /metrics: an operator whose router's prefix index drifts can see why
    collectors: list[Collector] = [PublisherCollector(pub, name)] if pub is not None else []
    if zmq_pub is not None:
        collectors.append(ZmqPublisherCollector(zmq_pub, name, replay.desk if replay is not None else None))
    request_log = RequestLog(opts.request_log, opts.request_log_fd) if opts.request_log else None
    if request_log is not None:  # opened with the server's start, closed with its stop
        runner.on_close = request_log.write
        runner.on_flush.append(request_log.flush)
        collectors.append(RequestLogCollector(request_log, name))
    app = create_app(runner, TextModel(opts.mean_output_len), info, collectors, fail_generations=opts.fail_generations)
    app.state.publisher, app.state.zmq_publisher, app.state.zmq_replay = pub, zmq_pub, replay
    app.state.request_log = request_log
    kv_sinks = [s.queue_kv for s in (pub,) if s is not None and opts.kv_events]
    if zmq_pub is not None:
        kv_sinks.append(zmq_pub.publish)
    if kv_sinks:
        def fan_out_kv_events() -> None:
            batch = engine.take_kv_events()
            if batch is not None:
                for sink in kv_sinks:
                    sink(batch)

        runner.on_flush.append(fan_out_kv_events)
        if pub is not None and opts.kv_events:
            pub.flush_kv, pub.serve_snapshots = fan_out_kv_events, True

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks: list[asyncio.Task[None]] = []
        try:
            if request_log is not None:
                request_log.open()
            runner.t0 = runner.clock()
            runner.start()
            tasks = [asyncio.create_task(s.run()) for s in (pub, replay) if s is not None]
            log.info("%s", startup_line(opts, info, engine))
            yield
        finally:
            await cancel_until_done(tasks)
            await runner.stop()
            app.state.writer.close()
            if request_log is not None:
                request_log.close()
            for sock in (zmq_pub, replay):
                if sock is not None:
                    sock.close()

    app.router.lifespan_context = lifespan
    return app, runner


def _zmq_kv_events(opts: ServerOptions) -> tuple[ZmqKVPublisher | None, ZmqReplayServer | None]:
    """The ZMQ KV-event publisher and its replay endpoint, as ``opts`` ask (each None when not)."""
    if not opts.kv_events_zmq:
        return None, None
    if not opts.kv_events_replay_endpoint:
        return ZmqKVPublisher(opts.kv_events_zmq, opts.kv_events_topic), None
    kept = ReplayBuffer(opts.kv_events_replay_buffer)
    pub = ZmqKVPublisher(opts.kv_events_zmq, opts.kv_events_topic, replay=kept)
    try:
        return pub, ZmqReplayServer(opts.kv_events_replay_endpoint, ReplayDesk(kept))
    except ValueError:
        pub.close()
        raise


class QuietServer(uvicorn.Server):
    """uvicorn's server, waking once a second rather than ten times to refresh its Date header and check for
    exit (an idle wake-up costs tens of µs of CPU on a shared VM); an exit request is noticed at once."""

    def __init__(self, config: uvicorn.Config, read_timeout_s: float = REQUEST_READ_TIMEOUT_S) -> None:
        self._exit = asyncio.Event()
        self.read_timeout_s = read_timeout_s
        super().__init__(config)

    @property
    def should_exit(self) -> bool:
        """Whether the server is asked to stop (set by a signal or by the embedding code)."""
        return self._exit.is_set()

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        if value:
            self._exit.set()
        else:
            self._exit.clear()

    async def main_loop(self) -> None:
        """Tick once a second (uvicorn refreshes the Date header on every tenth tick) until asked to exit; each
        tick closes the connections stalled mid-request (``close_stalled``)."""
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 10) % 864000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exit.wait(), 1.0)
            close_stalled(self.server_state.connections, time.monotonic(), self.read_timeout_s)
            should_exit = await self.on_tick(counter)


def _uvicorn_config(app: FastAPI, opts: ServerOptions) -> uvicorn.Config:
    return uvicorn.Config(app, host=opts.host, port=opts.port, http=_http_protocol(), log_level="info",
                          access_log=opts.access_log, lifespan="on", log_config=log_config())


def serve(opts: ServerOptions) -> None:
    """Run the server until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    # no log format here or in uvicorn's names a source line, thread or process: skip looking them up for each
    # record (the logging HOWTO's "Optimization"); the access log writes one record per request
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    app, _ = build(opts)
    QuietServer(_uvicorn_config(app, opts), opts.request_read_timeout_s).run()


class EmbeddedServer:
    """A server running as a task in the caller's event loop (e.g. one per instance of an emulated worker)."""

    def __init__(self, opts: ServerOptions) -> None:
        self.app, self.runner = build(opts)
        self.url = f"http://{opts.host}:{opts.port}"
        self._server = QuietServer(_uvicorn_config(self.app, opts), opts.request_read_timeout_s)
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
    p.add_argument("--nats-url", default=None,
                   help=f"publish EngineMetrics on this NATS server (default ${ENGINE_NATS_URL_ENV}: a URL with a "
                        f"secret belongs there, as a command line is readable by every local user)")
    p.add_argument("--instance-id", default=d.instance_id)
    p.add_argument("--metrics-interval", type=float, default=d.metrics_interval_s, help="seconds between pushes")
    p.add_argument("--kv-snapshot-window", type=float, default=d.kv_snapshot_window_s,
                   help="seconds: prefix-cache snapshot requests are answered from one build at most once per window")
    p.add_argument("--no-kv-events", action="store_true", help="do not publish KV-cache events on NATS")
    p.add_argument("--kv-events-zmq", default=None, metavar="ENDPOINT",
                   help="also publish KV events on a ZMQ PUB socket bound here, vLLM's format (e.g. tcp://*:5557)")
    p.add_argument("--kv-events-topic", default="", help="ZMQ topic frame of KV events (vLLM's default: empty)")
    p.add_argument("--kv-events-replay-endpoint", default=None, metavar="ENDPOINT",
                   help="with --kv-events-zmq: a ZMQ ROUTER bound here replays kept batches from a sequence number "
                        "on to a subscriber that saw a gap, vLLM's replay protocol (e.g. tcp://*:5558)")
    p.add_argument("--kv-events-replay-buffer", type=int, default=d.kv_events_replay_buffer, metavar="BATCHES",
                   help=f"KV-event batches kept for replay (vLLM's buffer_steps; 1 to {MAX_REPLAY_BUFFER_BATCHES:,})")
    p.add_argument("--max-loras", type=int, default=d.max_loras, help="LoRA adapters per batch (0 = LoRA off)")
    p.add_argument("--max-cpu-loras", type=int, default=None, help="adapters kept loaded (default max-loras)")
    p.add_argument("--lora-modules", nargs="*", default=[], metavar="NAME[=PATH]",
                   help="adapters served beside the base model (vLLM's NAME=PATH form; the path is ignored)")
    p.add_argument("--lora-load-time", type=float, default=d.lora_load_s, help="seconds to load an adapter")
    p.add_argument("--role", choices=["mixed", "prefill", "decode"], default=d.role,
                   help="P/D disaggregation: prefill-only or decode-only engine")
    p.add_argument("--kv-link-gbps", type=float, default=d.kv_link_gbps,
                   help="P/D: KV transfer bandwidth between prefill and decode engines (Gbit/s)")
    p.add_argument("--kv-link-latency", type=float, default=d.kv_link_latency_s, help="P/D: seconds per transfer")
    p.add_argument("--disable-uvicorn-access-log", action="store_true", help="no access log line per request")
    p.add_argument("--request-log", default=None, metavar="PATH",
                   help="append one JSON line per ended request with its exact server-side timings (TTFT, queue, "
                        "e2e, cached tokens) to this file or pipe; the /metrics histograms only bucket them")
    p.add_argument("--fail-generations", action="store_true",
                   help="chaos: answer every completion with a 500, reporting as usual (broken model, live process)")
    a = p.parse_args(argv)
    if refused := credentials_on_command_line("--nats-url", a.nats_url, ENGINE_NATS_URL_ENV):
        sys.exit(f"{p.prog}: error: {refused}")
    a.nats_url = a.nats_url or os.environ.get(ENGINE_NATS_URL_ENV) or None
    try:  # only through the environment: a command line is readable by every local user
        report_key = parse_key(os.environ[REPORT_KEY_ENV], f"${REPORT_KEY_ENV}") if os.environ.get(REPORT_KEY_ENV) \
            else None
    except ValueError as err:
        p.error(str(err))
    if not 0 < a.speedup < math.inf:  # written so that nan fails too (nan <= 0 is False)
        p.error("--speedup must be > 0 and finite")
    if not (0 < a.kv_link_gbps < math.inf and 0 <= a.kv_link_latency < math.inf and 0 <= a.lora_load_time < math.inf):
        p.error("--kv-link-gbps must be > 0, --kv-link-latency and --lora-load-time >= 0, all finite")
    if not 0 <= a.kv_snapshot_window < math.inf:  # nan and inf too: inf answered one request, then none
        p.error(f"--kv-snapshot-window is a finite duration in seconds, got {a.kv_snapshot_window}")
    if a.kv_events_replay_endpoint and not a.kv_events_zmq:
        p.error("--kv-events-replay-endpoint replays the batches of --kv-events-zmq: give that too")
    if not 1 <= a.kv_events_replay_buffer <= MAX_REPLAY_BUFFER_BATCHES:
        p.error(f"--kv-events-replay-buffer is a number of batches from 1 to {MAX_REPLAY_BUFFER_BATCHES:,}, "
                f"got {a.kv_events_replay_buffer}")
    log_fd = None
    if a.request_log == "":  # given, but empty: not the same as not asking for a log
        p.error("--request-log needs a file path")
    if a.request_log:
        try:  # opened now, so a bad path is refused in one line, and kept: a FIFO's reader must not see it close
            log_fd = open_request_log(a.request_log)
        except OSError as err:
            p.error(f"--request-log {a.request_log}: {err.strerror or err}")
    loras = tuple(dict.fromkeys(m.split("=", 1)[0] for m in a.lora_modules))
    return ServerOptions(
        host=a.host, port=a.port, model=a.model, served_model_name=a.served_model_name, gpu=a.gpu, tp=a.tp,
        speedup=a.speedup, block_size=a.block_size, num_gpu_blocks=a.num_gpu_blocks, max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens, max_model_len=a.max_model_len,
        enable_prefix_caching=not a.no_prefix_caching, policy=a.policy, mean_output_len=a.mean_output_len,
        nats_url=a.nats_url, instance_id=a.instance_id, report_key=report_key, metrics_interval_s=a.metrics_interval,
        kv_snapshot_window_s=a.kv_snapshot_window, kv_events=not a.no_kv_events, kv_events_zmq=a.kv_events_zmq,
        kv_events_topic=a.kv_events_topic, kv_events_replay_endpoint=a.kv_events_replay_endpoint,
        kv_events_replay_buffer=a.kv_events_replay_buffer,
        max_loras=a.max_loras, max_cpu_loras=a.max_cpu_loras, lora_modules=loras,
        lora_load_s=a.lora_load_time, role=a.role, kv_link_gbps=a.kv_link_gbps, kv_link_latency_s=a.kv_link_latency,
        access_log=not a.disable_uvicorn_access_log, request_log=a.request_log or None, request_log_fd=log_fd,
        fail_generations=a.fail_generations,
    )
