"""The picker process: the routing core kept current from NATS events, the ext_proc gRPC server, and the
Envoy endpoint file (EDS) rewritten whenever the pool changes. Nothing is scraped per request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import nats
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from nats.aio.msg import Msg
from tokenizers import Tokenizer

from services.gateway.contract import CONTRACT
from services.gateway.epp import Picker
from services.gateway.pool import eds_document
from services.gateway.request import Tokenize
from shared.assets.tokenizer import TOKENIZER_FILE
from shared.bus import subjects
from shared.bus.messages import EngineKVEvents, EngineMetrics
from shared.bus.runtime import Bus
from shared.core.routing import Endpoint, Router, builtin_config
from shared.host.engine_feed import EngineFeed

log = logging.getLogger("gantry.gateway")


@dataclass(frozen=True, slots=True)
class GatewayOptions:
    """What ``python -m services.gateway`` accepts."""

    nats_url: str
    eds_path: Path
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 9002
    profile: str = "default"
    expire_s: float = 3.0
    seed: int = 0


def shipped_tokenizer() -> Tokenize:
    """Token ids with the emulated engines' tokenizer (the one they report as their model path)."""
    tok = Tokenizer.from_file(str(TOKENIZER_FILE))

    def tokenize(text: str) -> list[int]:
        return list(tok.encode(text).ids)

    return tokenize


def write_eds(path: Path, doc: dict[str, object]) -> None:
    """Replace Envoy's endpoint file atomically (Envoy watches the directory for the move)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


class Gateway:
    """One picker replica."""

    def __init__(self, opts: GatewayOptions) -> None:
        self.opts = opts
        self.router = Router(builtin_config(opts.profile), seed=opts.seed)
        self.feed = EngineFeed(self.router, opts.expire_s, on_pool=self._pool_changed)
        self.pool = self.feed.pool
        self.picker = Picker(self.router, self.pool_addresses, tokenize=shipped_tokenizer())
        self._eds_version = 0
        self.bus: Bus | None = None

    def pool_addresses(self) -> dict[str, str]:
        """Endpoint id → host:port."""
        return self.feed.addresses

    def _pool_changed(self, eps: list[Endpoint]) -> None:
        self._eds_version += 1
        write_eds(self.opts.eds_path, eds_document(eps, self._eds_version))

    async def _on_metrics(self, msg: Msg) -> None:
        assert self.bus is not None
        m = await self.bus.decode_or_reject(msg.subject, msg.data, EngineMetrics)
        if m is None:
            return
        try:
            self.feed.on_metrics(m, time.time())
        except ValueError as err:  # an address Envoy could not dial
            await self.bus.dead_letter(msg.subject, str(err), msg.data)

    async def _on_kv(self, msg: Msg) -> None:
        assert self.bus is not None
        ev = await self.bus.decode_or_reject(msg.subject, msg.data, EngineKVEvents)
        if ev is not None:
            self.feed.on_kv(ev)

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.opts.expire_s / 2))
            self.feed.expire(time.time())

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Serve until cancelled."""
        self.opts.eds_path.parent.mkdir(parents=True, exist_ok=True)
        write_eds(self.opts.eds_path, eds_document([], 0))
        nc = await nats.connect(self.opts.nats_url, max_reconnect_attempts=-1)
        self.bus = Bus(nc, CONTRACT.service, declared=CONTRACT.emit_check())
        await nc.subscribe(subjects.ENGINE_METRICS_ALL, cb=self._on_metrics)
        await nc.subscribe(subjects.ENGINE_KV_EVENTS_ALL, cb=self._on_kv)
        server = grpc.aio.server()
        pb_grpc.add_ExternalProcessorServicer_to_server(self.picker, server)
        server.add_insecure_port(f"{self.opts.grpc_host}:{self.opts.grpc_port}")
        await server.start()
        expire = asyncio.create_task(self._expire_loop())
        log.info("gantry EPP on %s:%d (profile %s)", self.opts.grpc_host, self.opts.grpc_port, self.opts.profile)
        if ready is not None:
            ready.set()
        try:
            await server.wait_for_termination()
        finally:
            expire.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await expire
            await server.stop(1.0)
            with contextlib.suppress(Exception):
                await nc.drain()
