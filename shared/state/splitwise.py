"""Splitwise broker on Redis (seed 003, "splitwise"): a front that assigns prefill and decode nodes, and the
inference nodes' side (heartbeats with load, request pulls, results back to the front).

Layout under ``gantry:sw:{topic}:``: ``cluster`` HASH node -> heartbeat record (role, load, time, host,
transfer protocols); ``req:<node>`` LIST (producers LPUSH, the node RPOPs: FIFO); ``resp:<front>`` LIST of
output chunks. A request for a prefill node and a decode node is queued on both in one transaction, decode
first (the decode node must expect the KV before the prefill node can send it). Decisions come from
``shared.core.queueing.splitwise``.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import msgspec
import redis.asyncio as aioredis

from shared.core.queueing import (
    NodeInfo,
    NodeLoad,
    Output,
    PullBudget,
    PutAnswer,
    QueuedRequest,
    SchedulerParams,
    SplitRequest,
    admit,
    assign,
    expiry_answer,
    is_expired,
    live_nodes,
)
from shared.core.queueing.splitwise import parse_node
from shared.core.roles import NodeRole

_enc = msgspec.json.Encoder()
_dec_split = msgspec.json.Decoder(SplitRequest)
_dec_out = msgspec.json.Decoder(Output)
NO_NODES = "no live prefill and decode (or mixed) node in the topic"
DUPLICATE = "duplicated request_id"


def _base(topic: str) -> str:
    return f"gantry:sw:{{{topic}}}:"


class SplitwiseFront:
    """The node holding client connections: assigns each request a prefill and a decode node."""

    def __init__(self, client: aioredis.Redis, params: SchedulerParams, node: str, *,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.time) -> None:
        self.r = client
        self.params = params.checked()
        self.node = node
        self.base = _base(params.topic)
        self.rng = rng or random.Random()
        self.clock = clock
        self.cluster: list[NodeInfo] = []
        self._open: dict[str, QueuedRequest] = {}  # requests queued and not yet finished, by id

    async def sync_cluster(self, now: float | None = None) -> list[NodeInfo]:
        """Read heartbeats; keep nodes with a known role and a heartbeat younger than the expiry."""
        t = self.clock() if now is None else now
        raw = await self.r.hgetall(self.base + "cluster")
        records = [n for n in (parse_node(v) for v in raw.values()) if n is not None]
        self.cluster = sorted(live_nodes(records, t, self.params.expire_period_s), key=lambda n: n.node)
        return self.cluster

    async def put_requests(self, reqs: Sequence[QueuedRequest], now: float | None = None) -> list[PutAnswer]:
        """Assign and queue each request (after :meth:`sync_cluster`); an unservable one is refused."""
        t = self.clock() if now is None else now
        answers: list[PutAnswer] = []
        pipe = self.r.pipeline(transaction=True)
        for r in reqs:
            problem = r.problem()
            if problem is not None:
                answers.append((r.request_id, f"invalid request: {problem}"))
                continue
            a = assign(r.prompt_len, self.cluster, self.rng)
            if a is None:
                answers.append((r.request_id, NO_NODES))
                continue
            item = _enc.encode(SplitRequest(request=msgspec.structs.replace(r, arrival_s=t, origin=self.node),
                                            prefill=a.prefill, decode=a.decode, protocol=a.protocol,
                                            front=self.node))
            if r.request_id in self._open:
                answers.append((r.request_id, DUPLICATE))
                continue
            if a.decode is not None:
                pipe.lpush(self.base + "req:" + a.decode, item)
            pipe.lpush(self.base + "req:" + a.prefill, item)
            self._open[r.request_id] = msgspec.structs.replace(r, arrival_s=t, origin=self.node)
            answers.append((r.request_id, None))
        await pipe.execute()
        return answers

    async def get_results(self, limit: int | None = None, now: float | None = None) -> dict[str, list[Output]]:
        """Output chunks for this front's clients, by request id.

        A request with no final chunk ``scheduler_ttl`` after it was queued (its node died holding it, or it is
        stuck) is answered ``EXPIRED`` here and forgotten: later chunks for it are dropped, never delivered twice.
        """
        t = self.clock() if now is None else now
        n = limit or self.params.reader_batch_size
        raw: list[bytes] | None = await self.r.rpop(self.base + "resp:" + self.node, n)  # type: ignore[assignment]
        out: dict[str, list[Output]] = {}
        for item in raw or []:
            try:
                o = _dec_out.decode(item)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if o.request_id not in self._open:
                continue  # answered already (finished, or expired here)
            out.setdefault(o.request_id, []).append(o)
            if o.finished:
                del self._open[o.request_id]
        for rid, req in list(self._open.items()):
            if is_expired(req, t, self.params.ttl_s):
                del self._open[rid]
                out.setdefault(rid, []).append(expiry_answer(req, t, self.params.ttl_s, self.node))
        return out

    def open_requests(self) -> int:
        """Requests queued by this front and not answered yet."""
        return len(self._open)


class SplitwiseNode:
    """An inference node in splitwise mode: reports its role and load, pulls its queue, returns results."""

    def __init__(self, client: aioredis.Redis, params: SchedulerParams, node: str, role: NodeRole, *,
                 host: str = "", protocols: tuple[str, ...] = ("rdma",), clock: Callable[[], float] = time.time,
                 ) -> None:
        self.r = client
        self.params = params.checked()
        self.node = node
        self.role = role
        self.host = host
        self.protocols = protocols
        self.base = _base(params.topic)
        self.clock = clock
        self.load = NodeLoad(role, params.release_load_expire_period_s)
        self._queue: deque[SplitRequest] = deque()
        self._serving: dict[str, SplitRequest] = {}
        self.expired = 0
        self.corrupt = 0

    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else now

    async def report(self, now: float | None = None) -> None:
        """Heartbeat with the current load (every ``sync_period_s``); drops silent requests' load first."""
        t = self._now(now)
        self.load.expire(t)
        info = NodeInfo(node=self.node, role=self.role, load=self.load.load, ts=t, host=self.host,
                        protocols=self.protocols)
        await self.r.hset(self.base + "cluster", self.node, _enc.encode(info))

    async def get_requests(self, budget: PullBudget, now: float | None = None) -> list[SplitRequest]:
        """Requests for the engine; ones past the TTL are answered ``EXPIRED`` to their front instead."""
        t = self._now(now)
        raw: list[bytes] | None = await self.r.rpop(  # type: ignore[assignment]
            self.base + "req:" + self.node, max(budget.batch, 1) * 4)
        for item in raw or []:
            try:
                sr = _dec_split.decode(item)
            except (msgspec.DecodeError, msgspec.ValidationError):
                self.corrupt += 1  # nobody to answer: counted, never fatal
                continue
            self._queue.append(sr)
            self.load.add(sr.request.request_id, sr.request.prompt_len, t)
        expired = [sr for sr in self._queue if is_expired(sr.request, t, self.params.ttl_s)]
        if expired:
            self._queue = deque(sr for sr in self._queue if not is_expired(sr.request, t, self.params.ttl_s))
            for sr in expired:
                self._serving[sr.request.request_id] = sr
            self.expired += len(expired)
            await self.put_results([expiry_answer(sr.request, t, self.params.ttl_s, self.node) for sr in expired], t)
        if self.role is NodeRole.DECODE:  # decode work arrives with the KV: hand every request on
            n = len(self._queue) if budget.batch > 0 else 0
        else:
            n = admit([sr.request for sr in list(self._queue)[: budget.batch]], budget)
        out = [self._queue.popleft() for _ in range(n)]
        for sr in out:
            self._serving[sr.request.request_id] = sr
        return out

    async def put_results(self, outputs: Iterable[Output], now: float | None = None) -> list[str]:
        """Send output chunks to each request's front; the prefill node's first token never ends the stream."""
        t = self._now(now)
        dropped: list[str] = []
        pipe = self.r.pipeline(transaction=True)
        keys: set[str] = set()
        for o in outputs:
            sr = self._serving.get(o.request_id)
            if sr is None:
                dropped.append(o.request_id)
                continue
            if o.finished or o.failed:
                self.load.finish(o.request_id)
                del self._serving[o.request_id]
            else:
                self.load.touch(o.request_id, t)
            if self.role is NodeRole.PREFILL and sr.decode is not None and not o.failed:
                if o.seq > 0:
                    continue  # decode streams the rest
                o = msgspec.structs.replace(o, finished=False)
            key = self.base + "resp:" + sr.front
            pipe.lpush(key, _enc.encode(msgspec.structs.replace(o, served_by=o.served_by or self.node)))
            keys.add(key)
        for key in keys:
            pipe.expire(key, int(max(self.params.ttl_s, 60)))
        if keys:
            await pipe.execute()
        return dropped
