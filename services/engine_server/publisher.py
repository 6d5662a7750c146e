"""Pushes the server's state on NATS (routing spec §1, model-server protocol): its load every 50-100 ms
(EngineMetrics) and its KV-cache events after every step that changed the prefix cache (EngineKVEvents).

The step loop only queues KV batches (:meth:`Publisher.take_kv_events` runs after each step); a task sends
them, numbered, so the loop never waits on NATS. While NATS is unreachable, at most ``MAX_KV_BACKLOG``
batches wait; older ones are dropped and the numbering shows the gap to consumers (``kv_dropped`` counts them,
``/metrics`` shows it).

A picker that first sees this server asks for a snapshot of its prefix cache (``subjects.engine_kv_snapshot``):
the answer, signed like every report, holds the cached block hashes and the number of the first KV message it
does not cover, so the picker applies only the events from that one on. Requests are coalesced: they queue (at most
``MAX_SNAPSHOT_WAITING``), and at most once per window (``snapshot_window_s``) up to ``SNAPSHOT_ANSWERS`` of them are
answered from one build of the snapshot, or from the last build while no KV message was queued since (the cache is
as it was). Each answer still carries its requester's nonce and its own signature stamp, so it verifies and is
fresh at the picker; a flood of requests costs at most one build and a bounded number of signatures per window.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NatsClient

from services.engine_server.runner import EngineRunner
from shared.bus import subjects
from shared.bus.connection import url_credentials
from shared.bus.messages import (
    MAX_SNAPSHOT_BLOCKS,
    SCHEMA_VERSION,
    EngineKVEvents,
    EngineKVSnapshot,
    EngineMetrics,
    KVSnapshotRequest,
    MessageError,
    decode,
    encode,
)
from shared.core.coalesce import AnswerWindow
from shared.core.kv_events import KVEventBatch, split_batch
from shared.envsettings import without_user
from shared.host.disconnect import close_promptly
from shared.host.report_auth import KV, METRICS, SNAPSHOT, ReportSigner, signed_headers
from shared.host.tasks import cancel_until_done

log = logging.getLogger("gantry.engine_server")

MAX_KV_BACKLOG = 10_000
SNAPSHOT_WINDOW_S = 0.25
"""At most one batch of snapshot answers (one build) per this many seconds. A build takes the step loop's event
loop ~1.5 ms at 20,000 blocks, so a flood costs it under 1 % for builds; a requester waits at most this long more
than before, far inside a picker's 2 s timeout."""
SNAPSHOT_ANSWERS = 16
"""Requests answered per window (each answer is signed on its own: ~0.3 ms at 20,000 blocks): a picker replica asks
once per engine it first sees, so a handful of replicas fit in one window; a flood costs at most this many
signatures per window."""
MAX_SNAPSHOT_WAITING = 64
"""Requests waiting for an answer; past this, one is dropped (its requester times out and goes on with KV events
only). The queue drains in MAX_SNAPSHOT_WAITING / SNAPSHOT_ANSWERS windows (1 s), inside the requester's timeout."""
TLS_CA_ENV = "GANTRY_TLS_CA_FILE"  # set for every child of a stack started with --tls


def tls_options() -> dict[str, Any]:
    """NATS over TLS: trust the CA a stack names (its engine servers inherit the variable from the fleet that
    starts them); nothing without one (nats-py's default context then checks against the system's CAs)."""
    ca = os.environ.get(TLS_CA_ENV)
    return {"tls": ssl.create_default_context(cafile=ca)} if ca else {}


def snapshot(runner: EngineRunner, instance_id: str, model: str, url: str, *, kv_events_dropped: int = 0,
             kv_snapshot_requests_dropped: int = 0) -> EngineMetrics:
    """The current figures as a bus message (with what the publisher dropped, as it says)."""
    s = runner.engine.scheduler
    c = s.counters
    lora = s.lora_stats()
    return EngineMetrics(
        instance_id=instance_id, model=model, url=url, ts=time.time(),
        num_requests_running=len(s.running), num_requests_waiting=s.num_waiting,
        kv_cache_usage_perc=s.kv_usage, block_size=s.config.block_size, num_gpu_blocks=s.config.num_gpu_blocks,
        running_loras=list(lora.running), waiting_loras=list(lora.waiting), max_loras=lora.max_loras,
        prefix_cache_queries=c.prefix_queries, prefix_cache_hits=c.prefix_hits, num_preemptions=c.preemptions,
        prompt_tokens=c.prompt_tokens, generation_tokens=c.generation_tokens, role=s.config.role.value,
        num_requests_waiting_for_remote_kv=len(s.remote_wait), clock_lag_s=max(runner.lag.last_s, 0.0),
        kv_events_dropped=kv_events_dropped, kv_snapshot_requests_dropped=kv_snapshot_requests_dropped,
    )


class SnapshotAnswer(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """An EngineKVSnapshot as sent: the same JSON, with the block hashes encoded once per build (``Raw``) and not
    once per requester."""

    v: int = SCHEMA_VERSION
    instance_id: str
    model: str
    nonce: str
    next_seq: int
    block_hashes: msgspec.Raw
    total: int


@dataclass
class SnapshotBuild:
    """One build of the prefix-cache snapshot: valid for every request while ``next_seq`` is still the number of
    the next KV message (no step changed the cache since)."""

    next_seq: int
    block_hashes: list[int]
    total: int
    answers: int = 0  # answers made from it
    # the hashes' JSON array, made when a second answer needs it (a lone answer encodes the list once, as ever)
    encoded: msgspec.Raw | None = None


class Publisher:
    """One server's NATS publisher: metrics on a timer, KV events as steps make them."""

    def __init__(self, runner: EngineRunner, nats_url: str, instance_id: str, model: str, url: str,
                 interval_s: float = 0.075, report_key: bytes | None = None,
                 snapshot_window_s: float = SNAPSHOT_WINDOW_S) -> None:
        self.runner, self.nats_url, self.instance_id = runner, nats_url, instance_id
        # this instance's own key signs every message, stamped with this process's epoch and a number per kind so
        # that a recorded message cannot be replayed (None: unsigned)
        self.signer = ReportSigner(report_key) if report_key is not None else None
        self.model, self.url, self.interval_s = model, url, interval_s
        self.kv: deque[KVEventBatch] = deque()
        self.kv_seq = 0  # number of the next KV message
        self.kv_dropped = 0
        self._kv_ready = asyncio.Event()
        self._nc: NatsClient | None = None
        self._connecting = asyncio.Lock()
        # takes the engine's KV events not yet queued (those of a step whose tokens have not gone out) into the
        # queue: a snapshot is of the cache as it is, so its numbering must count them
        self.flush_kv: Callable[[], None] = lambda: None
        self.serve_snapshots = False  # answer snapshot requests (only where KV events are published)
        self._snap_window = AnswerWindow(snapshot_window_s)
        self._snap_waiting: deque[tuple[str, str]] = deque()  # (reply subject, nonce) of requests not answered yet
        self._snap_ready = asyncio.Event()
        self._snap_last: SnapshotBuild | None = None
        self.snapshot_builds = 0  # builds made (a test and the logs read it)
        self.snapshot_dropped = 0  # requests dropped with the queue full

    def queue_kv(self, batch: KVEventBatch) -> None:
        """Queue one step's KV events for publishing, as messages each within the followers' bound (runs on the
        step loop; no I/O)."""
        for part in split_batch(batch):
            self._queue(part)

    def _queue(self, batch: KVEventBatch) -> None:
        if len(self.kv) >= MAX_KV_BACKLOG:
            self.kv.popleft()
            self.kv_dropped += 1
            self.kv_seq += 1  # the dropped batch keeps its number: consumers see the gap
            if self.kv_dropped & (self.kv_dropped - 1) == 0:  # the 1st, 2nd, 4th...: not a line a step
                log.warning("publisher: %d KV event batches dropped (more than %d waiting for NATS)", self.kv_dropped,
                            MAX_KV_BACKLOG)
        self.kv.append(batch)
        self._kv_ready.set()

    def report(self) -> EngineMetrics:
        """The figures pushed on each tick, with what this publisher dropped so far."""
        return snapshot(self.runner, self.instance_id, self.model, self.url, kv_events_dropped=self.kv_dropped,
                        kv_snapshot_requests_dropped=self.snapshot_dropped)

    async def run(self) -> None:
        """Connect (retrying) and publish until cancelled; a NATS outage never stops serving."""
        tasks = [asyncio.create_task(self._metrics_loop()), asyncio.create_task(self._kv_loop())]
        if self.serve_snapshots:
            tasks += [asyncio.create_task(self._snapshot_service()), asyncio.create_task(self._snapshot_answers())]
        try:
            await asyncio.gather(*tasks)
        finally:
            await cancel_until_done(tasks)  # nats-py's requests can lose one cancel() on Python 3.11
            if self._nc is not None:
                await close_promptly(self._nc)  # bounded: NATS may be gone or not answering

    async def _client(self) -> NatsClient:
        nc = self._nc
        if nc is not None and nc.is_connected:
            return nc
        # one connection for every task: NATS lets the engine identity answer a snapshot request only on the
        # connection it arrived on, and tasks that each opened one when none was up answered on another (refused:
        # the picker never warmed up) and left the others open
        async with self._connecting:
            return await self._connect()

    async def _connect(self) -> NatsClient:
        while self._nc is None or not self._nc.is_connected:
            if self._nc is not None and self._nc.is_reconnecting:
                await asyncio.sleep(0.1)
                continue
            try:
                self._nc = await nats.connect(self.nats_url, connect_timeout=2, max_reconnect_attempts=-1,
                                              **tls_options(), **url_credentials(self.nats_url))
            except Exception as err:
                log.warning("publisher: cannot reach NATS at %s: %s", without_user(self.nats_url), err)
                await asyncio.sleep(1.0)
        return self._nc

    async def _metrics_loop(self) -> None:
        subject = subjects.engine_metrics(self.instance_id)
        while True:
            nc = await self._client()
            try:
                data = encode(self.report())
                await nc.publish(subject, data, headers=signed_headers(self.signer, METRICS, data))
            except Exception as err:
                log.warning("publisher: metrics publish failed: %s", err)
            await asyncio.sleep(self.interval_s)

    async def _kv_loop(self) -> None:
        subject = subjects.engine_kv_events(self.instance_id)
        while True:
            if not self.kv:
                self._kv_ready.clear()
                await self._kv_ready.wait()
                continue
            nc = await self._client()
            batch = self.kv[0]
            msg = EngineKVEvents(instance_id=self.instance_id, model=self.model, seq=self.kv_seq, batch=batch)
            try:
                data = encode(msg)
                await nc.publish(subject, data, headers=signed_headers(self.signer, KV, data))
            except Exception as err:
                log.warning("publisher: KV events publish failed (will retry): %s", err)
                await asyncio.sleep(0.1)
                continue
            if self.kv and self.kv[0] is batch:
                self.kv.popleft()
                self.kv_seq += 1

    def kv_snapshot(self, nonce: str) -> EngineKVSnapshot:
        """The prefix cache's block hashes now (the most recently cached ``MAX_SNAPSHOT_BLOCKS``, oldest first)
        and the number of the first KV message not in them (runs on the event loop, between steps: the cache
        and the queue agree)."""
        built = self.snapshot_build()
        return EngineKVSnapshot(instance_id=self.instance_id, model=self.model, nonce=nonce,
                                next_seq=built.next_seq, block_hashes=built.block_hashes, total=built.total)

    def snapshot_build(self) -> SnapshotBuild:
        """The snapshot as of now: the last build while no KV message was queued since (the cache is as it was:
        every change to it is a KV message), else a new one."""
        self.flush_kv()
        next_seq = self.kv_seq + len(self.kv)
        last = self._snap_last
        if last is not None and last.next_seq == next_seq:
            return last
        cached = self.runner.engine.scheduler.kv.cached
        newest = list(itertools.islice(reversed(cached), MAX_SNAPSHOT_BLOCKS))
        newest.reverse()
        self._snap_last = SnapshotBuild(next_seq, newest, len(cached))
        self.snapshot_builds += 1
        return self._snap_last

    def snapshot_answer(self, built: SnapshotBuild, nonce: str) -> bytes:
        """One requester's answer (its nonce) from ``built``: EngineKVSnapshot's JSON."""
        built.answers += 1
        if built.answers == 1:
            return encode(EngineKVSnapshot(instance_id=self.instance_id, model=self.model, nonce=nonce,
                                           next_seq=built.next_seq, block_hashes=built.block_hashes, total=built.total))
        if built.encoded is None:
            built.encoded = msgspec.Raw(msgspec.json.encode(built.block_hashes))
        return encode(SnapshotAnswer(instance_id=self.instance_id, model=self.model, nonce=nonce,
                                     next_seq=built.next_seq, block_hashes=built.encoded, total=built.total))

    def ask_snapshot(self, reply: str, nonce: str) -> bool:
        """Queue a snapshot request (answered by ``_snapshot_answers``); False when the queue is full (dropped)."""
        if len(self._snap_waiting) >= MAX_SNAPSHOT_WAITING:
            self.snapshot_dropped += 1
            if self.snapshot_dropped & (self.snapshot_dropped - 1) == 0:  # the 1st, 2nd, 4th...: not a line each
                log.warning("publisher: %d snapshot requests dropped (more than %d waiting)", self.snapshot_dropped,
                            MAX_SNAPSHOT_WAITING)
            return False
        self._snap_waiting.append((reply, nonce))
        self._snap_ready.set()
        return True

    async def _snapshot_answers(self) -> None:
        """Answer the queued snapshot requests: at most ``SNAPSHOT_ANSWERS`` per window, from one build."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._snap_waiting:
                self._snap_ready.clear()
                await self._snap_ready.wait()
                continue
            decision = self._snap_window.ask(loop.time())
            if decision.at > loop.time():
                await asyncio.sleep(decision.at - loop.time())
            self._snap_window.answered(loop.time())
            try:
                await self._answer_snapshots()
            except Exception:  # this task also ends run()'s gather: a failed build must not stop metrics and events
                log.exception("publisher: %d snapshot requests dropped", len(self._snap_waiting))
                self._snap_waiting.clear()  # the requesters time out and fall back to the KV events

    async def _answer_snapshots(self) -> None:
        """Answer up to ``SNAPSHOT_ANSWERS`` waiting requests from one build of the cache as of now (every request
        waiting arrived before it)."""
        nc = await self._client()
        built = self.snapshot_build()
        for _ in range(min(SNAPSHOT_ANSWERS, len(self._snap_waiting))):
            reply, nonce = self._snap_waiting.popleft()
            data = self.snapshot_answer(built, nonce)
            try:
                await nc.publish(reply, data, headers=signed_headers(self.signer, SNAPSHOT, data))
            except Exception as err:
                log.warning("publisher: snapshot answer failed: %s", err)
            await asyncio.sleep(0)  # a step may run between two answers

    async def _snapshot_service(self) -> None:
        """Take requests for this server's prefix-cache snapshot (on its own subject) into the queue, reconnecting
        with the client; a malformed request is logged and dropped (the requester times out)."""
        subject = subjects.engine_kv_snapshot(self.instance_id)

        async def answer(msg: Any) -> None:
            try:
                if not msg.reply:
                    raise MessageError("no reply subject")
                req = decode(msg.data, KVSnapshotRequest)
            except MessageError as err:
                log.warning("publisher: snapshot request refused: %s", err)
                return
            self.ask_snapshot(msg.reply, req.nonce)

        while True:
            nc = await self._client()
            sub = await nc.subscribe(subject, cb=answer)
            while nc.is_connected or nc.is_reconnecting:  # nats-py resubscribes across reconnections
                await asyncio.sleep(1.0)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
