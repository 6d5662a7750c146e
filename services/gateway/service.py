"""The picker process: the routing core kept current from NATS events, the ext_proc gRPC server, and the
Envoy endpoint file (EDS) rewritten whenever the pool changes. Nothing is scraped per request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from tokenizers import Tokenizer

from services.gateway.authz import AccessLogSink, AuthzPicker
from services.gateway.authz import expire_forever as end_unlogged
from services.gateway.calls import picker_methods
from services.gateway.capture import TraceWriter
from services.gateway.contract import CONTRACT
from services.gateway.epp import OFFLOOP_TOKENIZE_CHARS, Picker
from services.gateway.feed_relay import FeedRelay, Kind, Relayed
from services.gateway.h2grpc import H2Connection
from services.gateway.http1 import Connections, OneByOne
from services.gateway.listen import fd_room, free_socket_path, private_dir, remove, restrict
from services.gateway.pieces import PieceTokenizer
from services.gateway.pool import eds_document
from services.gateway.protocol import (
    DEFAULT_SOCKET_DIR,
    GRPC_SOCKET,
    HTTP_SOCKET,
    PICKER_IDLE_TIMEOUT_S,
    PICKER_MAX_CONNECTIONS,
    PickerTransport,
)
from services.gateway.request import MAX_BODY_BYTES, Tokenize
from services.gateway.tls import HANDSHAKE_TIMEOUT_S, PickerTls, TlsListener, tls_listener
from shared.assets.tokenizer import TOKENIZER_FILE
from shared.bus import subjects
from shared.bus.connection import nats_options
from shared.bus.runtime import Bus
from shared.core.routing import Endpoint, Router, RouterConfig, builtin_config
from shared.core.routing.pool_source import PoolSource
from shared.envsettings import EnvSettings
from shared.host.disconnect import close_promptly
from shared.host.engine_feed import (
    EngineFeed,
    PlacedInstances,
    SnapshotFetcher,
    expire_forever,
    take_kv_events,
    take_metrics,
)
from shared.host.metrics import MetricsServer
from shared.host.outcomes import OutcomeShare
from shared.host.placement_follow import PlacementFollower
from shared.host.report_auth import ReportVerifier
from shared.host.report_metrics import registry_for
from shared.host.warmup import until_warm

log = logging.getLogger("gantry.gateway")

DEFAULT_GRPC_PORT = 9002  # TCP, when only the HTTP port is given
DEFAULT_HTTP_PORT = 9003  # TCP, when only the gRPC port is given


@dataclass(frozen=True, slots=True)
class GatewayOptions:
    """What ``python -m services.gateway`` accepts."""

    nats_url: str
    eds_path: Path
    grpc_host: str = "127.0.0.1"  # TCP only
    grpc_port: int | None = None  # given (or http_port): TCP on grpc_host; neither: unix sockets in socket_dir
    profile: str = "default"
    expire_s: float = 3.0
    seed: int = 0
    staleness_s: float | None = None  # override of the profile's metrics staleness bound (data and detector)
    capture: Path | None = None  # write the routed traffic here as a replayable trace (JSONL)
    capture_salt: str = ""  # keys the prefix-block hashes of the trace
    transport: PickerTransport = PickerTransport.EXT_PROC  # EXT_AUTHZ: HTTP checks on http_port, the log on grpc_port
    http_port: int | None = None  # ext_authz checks, /health and /v1/models (TCP; 9003 when only grpc_port is given)
    max_request_s: float = 660.0  # ext_authz: in flight this long without a log entry = the entry was lost
    feed_window_s: float | None = None  # engine reports via the relay child, batched this long; None: on this loop
    socket_dir: Path | None = None  # unix sockets here (GRPC_SOCKET, HTTP_SOCKET); None: DEFAULT_SOCKET_DIR
    # PLACEMENT: route only to engines whose instance placement holds RUNNING (instance events on NATS, the
    # state store read through redis_url at start, every resync_s and after a NATS reconnection); ENGINES:
    # every engine that reports
    pool_source: PoolSource = PoolSource.ENGINES
    redis_url: str | None = None
    tls_ca_file: str = ""  # NATS over TLS: the CA to trust (a stack's GANTRY_TLS_CA_FILE)
    # the engines' report master key: a report or KV message not signed with the key of the instance it claims is
    # dropped (shared.host.report_auth); None (a gateway without placement): every report is taken, as before
    report_master: bytes | None = None
    resync_s: float = 30.0  # PLACEMENT: the instances read from the state store again this often
    # PLACEMENT: a read of the instances given up after this long (the store's client alone can retry for about
    # a minute against an unreachable Redis; the events keep the pool current meanwhile)
    read_timeout_s: float = 10.0
    metrics_port: int = 0  # Prometheus /metrics (the refused engine reports) on this port; 0: not served
    metrics_host: str = "0.0.0.0"  # ... on this address (``gantry up``: 127.0.0.1)
    # a connection to the picker idle this long is closed (Envoy's config closes its own at half of it, first, given
    # the same as ops.envoy's --picker-idle-timeout-s; given apart, what the picker's close cuts is retried by Envoy,
    # docs/gateway.md); past max_connections open (or handshaking) on a listener, new ones are
    # closed at once: idle connections opened by a stranger cannot take all the picker's file descriptors
    idle_timeout_s: float = PICKER_IDLE_TIMEOUT_S
    max_connections: int = PICKER_MAX_CONNECTIONS
    # mutual TLS on the TCP listeners (services.gateway.tls): only a client with a certificate from its CA
    # (Envoy's) connects; None (and always on unix sockets): plain, as before
    tls: PickerTls | None = None

    @property
    def tcp(self) -> bool:
        """Listen on TCP ports (asked for by giving one) rather than on unix sockets (the default)."""
        return self.grpc_port is not None or self.http_port is not None

    @property
    def sockets(self) -> Path:
        """The directory of the unix sockets (when not ``tcp``)."""
        return (self.socket_dir or Path(DEFAULT_SOCKET_DIR)).resolve()

    def grpc_address(self) -> str:
        """The gRPC listener: ``host:port``, or ``unix:PATH`` (as Envoy and the log name it)."""
        if self.tcp:
            return f"{self.grpc_host}:{self.grpc_port if self.grpc_port is not None else DEFAULT_GRPC_PORT}"
        return f"unix:{self.sockets / GRPC_SOCKET}"

    def http_address(self) -> str:
        """The HTTP listener (ext_authz), for the log."""
        if self.tcp:
            return f"{self.grpc_host}:{self.http_port if self.http_port is not None else DEFAULT_HTTP_PORT}"
        return f"unix:{self.sockets / HTTP_SOCKET}"


def shipped_tokenizer() -> Tokenize:
    """Token ids with the emulated engines' tokenizer (the one they report as their model path)."""
    tok = Tokenizer.from_file(str(TOKENIZER_FILE))
    by_piece = PieceTokenizer(tok)  # on the event loop: ~5x cheaper than encode for a short ASCII chat

    def tokenize(text: str) -> list[int]:
        if len(text) >= OFFLOOP_TOKENIZE_CHARS:  # called on a worker thread: encode_batch frees the GIL
            return list(tok.encode_batch([text])[0].ids)
        return by_piece(text)

    return tokenize


def router_config(profile: str, staleness_s: float | None = None) -> RouterConfig:
    """A built-in profile, with the metrics staleness bound replaced when given (a loaded host's engines
    report late: a bound below their real reporting gap turns every pick into a 503)."""
    cfg = builtin_config(profile)
    if staleness_s is None:
        return cfg
    if not staleness_s > 0:
        raise ValueError(f"staleness must be > 0 s (got {staleness_s})")
    adm = cfg.admission
    return msgspec.structs.replace(
        cfg, data=msgspec.structs.replace(cfg.data, staleness_s=staleness_s),
        admission=msgspec.structs.replace(adm, detector=msgspec.structs.replace(adm.detector,
                                                                                staleness_s=staleness_s)))


MAX_MESSAGE_BYTES = MAX_BODY_BYTES + (1 << 20)  # an ext_proc message: the largest body the picker reads, and more
EDS_RETRY_S = 1.0  # how often a failed write of the endpoint file is tried again


def write_eds(path: Path, doc: dict[str, object]) -> None:
    """Replace Envoy's endpoint file atomically (Envoy watches the directory for the move); raises OSError, leaving
    no temporary file behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # replicas sharing the file never share a temp
    try:
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


class Gateway:
    """One picker replica."""

    def __init__(self, opts: GatewayOptions) -> None:
        self.opts = opts
        self.router = Router(router_config(opts.profile, opts.staleness_s), seed=opts.seed)
        self.placed = PlacedInstances()
        verifier = ReportVerifier(opts.report_master) if opts.report_master is not None else None
        self.feed = EngineFeed(self.router, opts.expire_s, on_pool=self._pool_changed, ip_only=True,
                               source=opts.pool_source, placed=self.placed.placed, verifier=verifier)
        self.snapshots = SnapshotFetcher(self.feed)  # a late or restarted replica learns the engines' caches
        self.follower = PlacementFollower(self.feed, self.placed, opts.redis_url, opts.resync_s, opts.read_timeout_s)
        self.pool = self.feed.pool
        self.capture = (TraceWriter(opts.capture, time.time(), opts.capture_salt.encode())
                        if opts.capture is not None else None)
        # engine failures told to and by the other replicas
        self.outcomes = OutcomeShare(self.router.state, subjects.GATEWAY_OUTCOMES)
        self.metrics = registry_for(CONTRACT.service, verifier, self.outcomes)
        self.picker = Picker(self.router, self.pool_addresses, tokenize=shipped_tokenizer(), capture=self.capture)
        self.authz = (AuthzPicker(self.picker, Connections(opts.idle_timeout_s, opts.max_connections))
                      if opts.transport is PickerTransport.EXT_AUTHZ else None)
        self._eds_version = 0
        self._eds_stale = False  # the last write of the endpoint file failed: written again each EDS_RETRY_S
        self.bus: Bus | None = None
        self.relay: FeedRelay | None = None  # the engine feed's child process, when feed_window_s is set

    def pool_addresses(self) -> dict[str, str]:
        """Endpoint id → host:port."""
        return self.feed.addresses

    def _pool_changed(self, eps: list[Endpoint]) -> None:
        self._eds_version += 1
        try:
            write_eds(self.opts.eds_path, eds_document(eps, self._eds_version))
            self._eds_stale = False
        except OSError as err:
            # the pool moved on (the router has it), the file did not: written again until it is, or Envoy keeps a
            # draining host and never hears of a new one (the feed sees no change to report after this one)
            if not self._eds_stale:
                log.error("cannot write Envoy's endpoint file %s (%s): retrying every second", self.opts.eds_path,
                          err)
            self._eds_stale = True

    async def _rewrite_eds_forever(self) -> None:
        """Write the endpoint file again while the last write failed."""
        while True:
            await asyncio.sleep(EDS_RETRY_S)
            if self._eds_stale:
                self._pool_changed(self.feed.routable)

    async def _on_metrics(self, msg: Msg) -> None:
        assert self.bus is not None
        await take_metrics(self.feed, self.bus, msg, time.time())

    async def _on_kv(self, msg: Msg) -> None:
        assert self.bus is not None
        await take_kv_events(self.feed, self.bus, msg)

    async def _take_outcomes(self, nc: NATS) -> None:
        """Count the other replicas' engine failures as this one's own (``OutcomeShare``)."""
        await nc.subscribe(subjects.GATEWAY_OUTCOMES, cb=self._on_outcomes)

    async def _on_outcomes(self, msg: Msg) -> None:
        assert self.bus is not None
        await self.outcomes.on_message(self.bus, msg)

    async def _on_relayed(self, batch: list[Relayed]) -> None:
        """One frame of the feed relay: each message as if it had arrived here (``at``: when the child took it)."""
        assert self.bus is not None
        for msg in batch:
            if msg.kind is Kind.KV:
                await take_kv_events(self.feed, self.bus, msg)
            else:
                await take_metrics(self.feed, self.bus, msg, msg.at)

    async def _subscribe(self, nc: NATS) -> FeedRelay | None:
        """The engine feed: through the relay child (``feed_window_s``), or subscribed on this loop."""
        if self.opts.feed_window_s is not None:
            relay = FeedRelay(self.opts.nats_url, self.opts.feed_window_s, self._on_relayed, self.opts.tls_ca_file)
            await relay.start()
            return relay
        await nc.subscribe(subjects.ENGINE_METRICS_ALL, cb=self._on_metrics)
        await nc.subscribe(subjects.ENGINE_KV_EVENTS_ALL, cb=self._on_kv)
        return None

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Serve until cancelled. Whatever it started is stopped when it ends, start-up failures included (a
        listener that cannot bind must not leave the feed relay child or the NATS connection behind)."""
        self.opts.eds_path.parent.mkdir(parents=True, exist_ok=True)
        if not self.opts.eds_path.exists():  # a replica (re)starting beside others must not empty their pool
            write_eds(self.opts.eds_path, eds_document([], 0))
        async with contextlib.AsyncExitStack() as stack:
            reconnected = asyncio.Event()

            async def on_reconnect() -> None:
                reconnected.set()

            # as every Gantry client: its identity's own reply inboxes (the only ones it may read), TLS when asked
            nc = await nats.connect(self.opts.nats_url, max_reconnect_attempts=-1, reconnected_cb=on_reconnect,
                                    **nats_options(EnvSettings(nats_url=self.opts.nats_url,
                                                               tls_ca_file=self.opts.tls_ca_file)))
            stack.push_async_callback(close_promptly, nc)  # bounded: NATS may be gone or not answering
            metrics = MetricsServer(self.metrics, self.opts.metrics_port, CONTRACT.service, self.opts.metrics_host)
            stack.callback(metrics.close)
            if self.capture is not None:
                stack.callback(self.capture.close)
            self.bus = self.snapshots.bus = Bus(nc, CONTRACT.service, declared=CONTRACT.emit_check())
            stack.push_async_callback(self.snapshots.close)
            if self.opts.pool_source is PoolSource.PLACEMENT:
                store = await self.follower.start(nc, self.bus)
                stack.push_async_callback(store.close)
                _background(stack, self.follower.resync_forever(store, reconnected))
            self.relay = await self._subscribe(nc)
            await self._take_outcomes(nc)
            _background(stack, self.outcomes.send_forever(self.bus))
            if self.relay is not None:
                stack.push_async_callback(self.relay.stop)
                _background(stack, self.relay.run())
            _background(stack, expire_forever(self.feed, self.opts.expire_s, time.time))
            _background(stack, self._rewrite_eds_forever())
            # Envoy sends a replica requests once its listener is up: not before it has heard its engines (else 503
            # "no endpoint" while the other replicas could route) and its peers' failing engines (shared.host.warmup)
            await until_warm(self.router.state)
            fd_room(2 * self.opts.max_connections)  # both listeners full, and the rest the picker holds
            if self.authz is not None:
                await self._serve_http(self.authz, stack)
                _background(stack, end_unlogged(self.authz, self.opts.max_request_s))
            await self._serve_grpc(stack)
            log.info("gantry EPP on %s (%s%s, profile %s)", self.opts.grpc_address(), self.opts.transport,
                     f" on {self.opts.http_address()}" if self.authz else "", self.opts.profile)
            if ready is not None:
                ready.set()
            await asyncio.get_running_loop().create_future()  # serve until cancelled

    async def _serve_grpc(self, stack: contextlib.AsyncExitStack) -> None:
        """The gRPC listener (ext_proc, the health check; the access log with ext_authz): the picker's own
        HTTP/2 server (``h2grpc``) on a unix socket unless a TCP port was asked for."""
        conns = Connections(self.opts.idle_timeout_s, self.opts.max_connections)
        _background(stack, conns.sweep_forever())
        methods = picker_methods(self.picker, AccessLogSink(self.authz) if self.authz is not None else None)

        def protocol() -> H2Connection:
            return H2Connection(methods, conns, MAX_MESSAGE_BYTES)

        if self.opts.tcp:
            port = self.opts.grpc_port if self.opts.grpc_port is not None else DEFAULT_GRPC_PORT
            tls = self.opts.tls
            grpc: asyncio.AbstractServer | TlsListener = (
                await asyncio.get_running_loop().create_server(protocol, self.opts.grpc_host, port) if tls is None
                else await tls_listener(protocol, self.opts.grpc_host, port, tls.h2_context, conns,
                                        HANDSHAKE_TIMEOUT_S))
        else:
            path = free_socket_path(private_dir(self.opts.sockets) / GRPC_SOCKET)
            grpc = await asyncio.get_running_loop().create_unix_server(protocol, str(path))
            stack.callback(remove, path)
            restrict(path)
        stack.callback(grpc.close)

    async def _serve_http(self, authz: AuthzPicker, stack: contextlib.AsyncExitStack) -> None:
        """The ext_authz checks' HTTP listener, on a unix socket unless a TCP port was asked for."""
        loop = asyncio.get_running_loop()
        conns = authz.connections
        assert conns is not None  # made with the AuthzPicker
        _background(stack, conns.sweep_forever())

        def protocol() -> OneByOne:
            return OneByOne(authz.answer, unsent=authz.unsent, conns=conns)

        if self.opts.tcp:
            port = self.opts.http_port if self.opts.http_port is not None else DEFAULT_HTTP_PORT
            http = await tcp_http_listener(protocol, self.opts.grpc_host, port, self.opts.tls, conns)
        else:
            path = free_socket_path(private_dir(self.opts.sockets) / HTTP_SOCKET)
            http = await loop.create_unix_server(protocol, str(path))
            stack.callback(remove, path)
            restrict(path)
        stack.callback(http.close)


async def tcp_http_listener(app: Callable[[], OneByOne], host: str, port: int, tls: PickerTls | None,
                            conns: Connections) -> asyncio.AbstractServer | TlsListener:
    """The HTTP listener on TCP (ext_authz checks): ``app`` per connection; with ``tls``, behind mutual TLS with
    each handshake counted under ``conns``'s cap from its accept (``tls.TlsListener``)."""
    if tls is None:
        return await asyncio.get_running_loop().create_server(app, host, port)
    return await tls_listener(app, host, port, tls.context, conns, HANDSHAKE_TIMEOUT_S)


def _background(stack: contextlib.AsyncExitStack, work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` as a task cancelled (and awaited) when ``stack`` closes."""
    task = asyncio.create_task(work)

    async def cancel() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(cancel)

