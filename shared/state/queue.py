"""Global request broker on Redis (seed 003, "global"): per-node queues, sharded load tables, work stealing,
results back to the origin node, recovery of dead nodes, exactly-once delivery.

Layout, all keys of a topic under one hash tag (``gantry:q:{topic}:``) so one Redis Cluster slot holds them:

- ``req:<node>`` LIST of request ids queued at a node (FIFO); ``body`` HASH id -> request JSON (with origin);
- ``load:<shard>`` ZSET node -> requests queued in its list (the steal score), shard = CRC-16 of the name;
- ``lease`` HASH id -> node serving it; ``inflight:<node>`` SET of ids it serves;
- ``resp:<node>`` LIST of output chunks for the requests whose client that node holds;
- ``sent`` HASH id -> highest chunk delivered; ``done`` ZSET id -> finish time (duplicates refused for a TTL);
- ``nodes`` ZSET node -> last heartbeat time (liveness is judged by age when read).
- ``replay:<call>`` STRING a script call's reply, for 300 s: a call sent again after a lost reply answers it
  (``shared.state.replay``).

Every step that touches several keys is one Lua script with its keys declared; each call does bounded work.
Decisions (what fits, whom to steal from) come from the pure core (``shared.core.queueing``).
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis

from shared.core.queueing import (
    Output,
    PullBudget,
    PutAnswer,
    QueuedRequest,
    SchedulerParams,
    choose_victim,
    expiry_answer,
    load_shard,
    steal_size,
)
from shared.core.queueing.admission import plan_pull
from shared.core.queueing.local import DUPLICATE
from shared.core.queueing.stealing import PEERS_PER_SHARD, SHARDS_PER_LOOKUP
from shared.state.replay import call_key, prelude

log = logging.getLogger("gantry.queue")
SERVED_IDS_KEPT = 100_000

_LUA = Path(__file__).parent / "lua"
_enc = msgspec.json.Encoder()
_dec_req = msgspec.json.Decoder(QueuedRequest)
_dec_out = msgspec.json.Decoder(Output)
PUT_CHUNK = 500  # requests per put script call
RECOVER_CHUNK = 200  # ids moved per recovery call
MAX_PULL = 512  # ids one pull looks at (a huge batch does not make one script call unbounded)
DELIVER_CHUNK = 500  # output chunks per delivery script call
TAKE_RETRIES = 3


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _decode_request(raw: object) -> QueuedRequest | None:
    """A stored request body; None when absent or corrupt (the id is then taken away: nobody to answer)."""
    if not isinstance(raw, bytes):
        return None
    try:
        return _dec_req.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _decode_outputs(raws: Iterable[bytes]) -> list[Output]:
    """Output chunks from a response list, skipping corrupt entries (they never stop a node)."""
    out: list[Output] = []
    for raw in raws:
        try:
            out.append(_dec_out.decode(raw))
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
    return out


def redis_client(params: SchedulerParams, username: str | None = None) -> aioredis.Redis:
    """A client for ``scheduler_host/port/db/password`` (global and splitwise modes); ``username`` for a Redis
    with ACL users (the seed's table has no user: the default user is meant when it is None)."""
    return aioredis.Redis(host=params.host, port=params.port, db=params.db, password=params.password or None,
                          username=username)


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """Key names of one topic."""

    topic: str
    shards: int

    @property
    def base(self) -> str:
        """Prefix of every key of the topic (a hash tag: one cluster slot)."""
        return f"gantry:q:{{{self.topic}}}:"

    def req(self, node: str) -> str:
        """A node's request list."""
        return f"{self.base}req:{node}"

    def inflight(self, node: str) -> str:
        """Ids a node is serving."""
        return f"{self.base}inflight:{node}"

    def resp(self, node: str) -> str:
        """Output chunks for the clients a node holds."""
        return f"{self.base}resp:{node}"

    def load(self, node: str) -> str:
        """The load table a node reports to."""
        return f"{self.base}load:{load_shard(node, self.shards)}"

    def load_table(self, shard: int) -> str:
        """Load table by shard number."""
        return f"{self.base}load:{shard}"

    @property
    def body(self) -> str:
        """Request bodies by id."""
        return self.base + "body"

    @property
    def lease(self) -> str:
        """Serving node by id."""
        return self.base + "lease"

    @property
    def sent(self) -> str:
        """Highest delivered chunk by id."""
        return self.base + "sent"

    @property
    def done(self) -> str:
        """Recently finished ids."""
        return self.base + "done"

    @property
    def nodes(self) -> str:
        """Heartbeat times by node."""
        return self.base + "nodes"

    @property
    def replay(self) -> str:
        """Prefix of the keys naming script calls (each: the call's reply, kept a while for a replay)."""
        return self.base + "replay:"


@dataclass(slots=True)
class BrokerStats:
    """What one node's broker did."""

    queued: int = 0
    taken_own: int = 0
    stolen: int = 0
    expired: int = 0
    recovered: int = 0
    refused_results: int = 0
    cas_retries: int = 0
    # the most recent finished ids (a long-running node kept every one: ~100 B a request, never let go)
    served_ids: deque[str] = field(default_factory=lambda: deque(maxlen=SERVED_IDS_KEPT))


class GlobalBroker:
    """One node's broker in global mode: the seed's interface over Redis, async.

    ``node`` must be unique per running process (a restarted process may reuse its name: ``start`` gives its
    leftover leases back to its own queue). Time comes from ``clock`` unless a call passes ``now``.
    """

    def __init__(self, client: aioredis.Redis, params: SchedulerParams, node: str, *,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.time) -> None:
        if not node or any(c.isspace() for c in node):
            raise ValueError(f"node name must be non-empty without spaces (got {node!r})")
        self.r = client
        self.params = params.checked()
        self.node = node
        self.keys = QueueKeys(params.topic, params.load_shards_num)
        self.rng = rng or random.Random()
        self.clock = clock
        self.stats = BrokerStats()
        self._taken: dict[str, QueuedRequest] = {}  # requests this node serves, by id (origin known)
        self._shard_cursor = self.rng.randrange(params.load_shards_num)
        # Each script's last key names its call: a replay (a retry after a lost reply) answers as the first run
        # (``shared.state.replay``), under the topic's hash tag.
        replay = prelude()
        self._put = client.register_script(replay + (_LUA / "q_put.lua").read_text())
        self._take = client.register_script(replay + (_LUA / "q_take.lua").read_text())
        self._deliver = client.register_script(replay + (_LUA / "q_deliver.lua").read_text())
        self._recover = client.register_script(replay + (_LUA / "q_recover.lua").read_text())

    def _now(self, now: float | None) -> float:
        return self.clock() if now is None else now

    # -- membership ----------------------------------------------------------------------------------
    async def start(self, now: float | None = None) -> int:
        """Announce the node and take back leases a previous run under this name left; ids requeued."""
        t = self._now(now)
        await self.heartbeat(t)
        k = self.keys
        moved = 0
        while True:
            n, finished = await self._recover(
                keys=[k.nodes, k.req(self.node), k.inflight(self.node), k.load(self.node), k.req(self.node),
                      k.load(self.node), k.lease, call_key(k.replay)],
                args=[self.node, self.node, t, self.params.expire_period_s, RECOVER_CHUNK, 1])
            moved += max(int(n), 0)
            if int(finished) or int(n) <= 0:
                return moved

    async def heartbeat(self, now: float | None = None) -> None:
        """Record that this node is alive (call every ``sync_period_s``)."""
        await self.r.zadd(self.keys.nodes, {self.node: self._now(now)})

    async def dead_nodes(self, now: float | None = None, limit: int = 16) -> list[str]:
        """Nodes whose heartbeat is older than ``expire_period_s`` (at most ``limit``)."""
        cutoff = self._now(now) - self.params.expire_period_s
        raw = await self.r.zrangebyscore(self.keys.nodes, "-inf", f"({cutoff}", start=0, num=limit)
        return [_s(n) for n in raw if _s(n) != self.node]

    async def recover_dead(self, now: float | None = None) -> int:
        """Move the queued and in-flight requests of every dead node to this node's queue; how many moved."""
        t = self._now(now)
        k = self.keys
        moved = 0
        for dead in await self.dead_nodes(t):
            while True:
                n, finished = await self._recover(
                    keys=[k.nodes, k.req(dead), k.inflight(dead), k.load(dead), k.req(self.node),
                          k.load(self.node), k.lease, call_key(k.replay)],
                    args=[dead, self.node, t, self.params.expire_period_s, RECOVER_CHUNK, 0])
                if int(n) < 0:
                    break  # it came back
                moved += int(n)
                if int(finished) or int(n) == 0:
                    break
        self.stats.recovered += moved
        return moved

    # -- the seed's interface ------------------------------------------------------------------------
    async def put_requests(self, reqs: Sequence[QueuedRequest], now: float | None = None) -> list[PutAnswer]:
        """Queue requests on this node (their origin); in order, per request ``(id, None)`` or ``(id, why not)``."""
        t = self._now(now)
        answers: dict[int, PutAnswer] = {}
        fresh: list[tuple[int, QueuedRequest]] = []
        seen: set[str] = set()
        for pos, r in enumerate(reqs):
            problem = r.problem()
            if problem is not None:
                answers[pos] = (r.request_id, f"invalid request: {problem}")
            elif r.request_id in seen:
                answers[pos] = (r.request_id, DUPLICATE)
            else:
                seen.add(r.request_id)
                fresh.append((pos, msgspec.structs.replace(r, arrival_s=t, origin=self.node)))
        k = self.keys
        for i in range(0, len(fresh), PUT_CHUNK):
            chunk = fresh[i : i + PUT_CHUNK]
            args: list[Any] = [self.node, t, self.params.ttl_s]
            for _, r in chunk:
                args += [r.request_id, _enc.encode(r)]
            keys = [k.req(self.node), k.body, k.done, k.load(self.node), k.nodes, call_key(k.replay)]
            flags = await self._put(keys=keys, args=args)
            for (pos, r), ok in zip(chunk, flags, strict=True):
                answers[pos] = (r.request_id, None if int(ok) else DUPLICATE)
                self.stats.queued += int(ok)
        return [answers[pos] for pos in sorted(answers)]

    async def get_requests(self, budget: PullBudget, now: float | None = None) -> list[QueuedRequest]:
        """Requests for the engine: from this node's queue, else stolen from a loaded peer.

        Requests past the TTL met on the way are answered ``EXPIRED`` (to their origin) and not returned.
        """
        t = self._now(now)
        if budget.empty:
            return []
        got = await self._take_from(self.node, budget.batch, budget, t)
        if got is not None:
            return got
        victim = await self._choose_victim()
        if victim is None:
            return []
        got = await self._take_from(victim, steal_size(budget.batch), budget, t)
        return got or []

    async def put_results(self, outputs: Iterable[Output], now: float | None = None) -> list[str]:
        """Send engine outputs to each request's origin; ids whose chunks were refused (not ours any more)."""
        t = self._now(now)
        by_origin: dict[str, list[Output]] = {}
        refused: list[str] = []
        for out in outputs:
            req = self._taken.get(out.request_id)
            if req is None:
                refused.append(out.request_id)
                continue
            by_origin.setdefault(req.origin, []).append(out)
        for origin, outs in by_origin.items():
            for i in range(0, len(outs), DELIVER_CHUNK):
                refused += await self._deliver_to(origin, outs[i : i + DELIVER_CHUNK], t)
        self.stats.refused_results += len(refused)
        return refused

    async def get_results(self, limit: int | None = None) -> dict[str, list[Output]]:
        """Output chunks for this node's clients, by request id (at most ``limit``, default reader batch)."""
        n = limit or self.params.reader_batch_size
        raw: list[bytes] | None = await self.r.lpop(self.keys.resp(self.node), n)  # type: ignore[assignment]
        out: dict[str, list[Output]] = {}
        for o in _decode_outputs(raw or []):
            out.setdefault(o.request_id, []).append(o)
        return out

    async def queued(self, node: str | None = None) -> int:
        """Requests queued at a node (this one by default)."""
        return int(await self.r.llen(self.keys.req(node or self.node)))

    def serving(self) -> int:
        """Requests this node holds leases on (taken, not yet finished)."""
        return len(self._taken)

    async def queued_ids(self, node: str | None = None) -> list[str]:
        """Ids queued at a node (this one by default), in order."""
        return [_s(i) for i in await self.r.lrange(self.keys.req(node or self.node), 0, -1)]

    async def results_of(self, node: str, limit: int = 500) -> list[Output]:
        """Pop up to ``limit`` output chunks from any node's response list (an operator or a test reading the
        answers of a node that died)."""
        raw: list[bytes] | None = await self.r.lpop(self.keys.resp(node), limit)  # type: ignore[assignment]
        return _decode_outputs(raw or [])

    # -- steps ---------------------------------------------------------------------------------------
    async def _choose_victim(self) -> str | None:
        shards = self.params.load_shards_num
        for _ in range(min(SHARDS_PER_LOOKUP, shards)):
            table = self.keys.load_table(self._shard_cursor % shards)
            self._shard_cursor += 1
            raw = await self.r.zrangebyscore(table, self.params.min_load_score, "+inf", start=0,
                                             num=PEERS_PER_SHARD, withscores=True)
            peers = [(_s(pair[0]), float(pair[1])) for pair in raw]
            victim = choose_victim(peers, self.node, self.params.min_load_score, self.rng)
            if victim is not None:
                return victim
        return None

    async def _take_from(self, src: str, limit: int, budget: PullBudget, t: float) -> list[QueuedRequest] | None:
        """Take what fits from the head of ``src``'s list; None when the list is empty."""
        k = self.keys
        limit = min(max(limit, 1), MAX_PULL)
        for _ in range(TAKE_RETRIES):
            ids = [_s(i) for i in await self.r.lrange(k.req(src), 0, limit - 1)]
            if not ids:
                return None
            pipe = self.r.pipeline(transaction=False)
            pipe.hmget(k.body, ids)
            pipe.hmget(k.sent, ids)
            bodies, sent = await pipe.execute()
            # a request put back by the recovery of a dead node after it had answered part of its stream was
            # handed to an engine once: re-run, not answered "expired" (a second chunk 0 after a real one)
            head = [req if req is None or s is None else msgspec.structs.replace(req, arrival_s=t)
                    for req, s in zip(map(_decode_request, bodies), sent, strict=True)]
            plan = plan_pull(head, budget, t, self.params.ttl_s)
            if plan.count == 0:
                return []
            taken_ids = ids[: plan.count]
            ok = await self._take(keys=[k.req(src), k.load(src), k.lease, k.inflight(self.node), k.nodes,
                                        call_key(k.replay)],
                                  args=[self.node, src, t, *taken_ids])
            if not int(ok):
                self.stats.cas_retries += 1
                continue
            return await self._after_take(src, taken_ids, head[: plan.count], set(plan.expired), t)
        return []

    async def _after_take(self, src: str, ids: Sequence[str], taken: Sequence[QueuedRequest | None],
                          expired: set[int], t: float) -> list[QueuedRequest]:
        out: list[QueuedRequest] = []
        answers: list[Output] = []
        unreadable = [rid for rid, req in zip(ids, taken, strict=True) if req is None]
        if unreadable:  # a queued id without a readable body: nothing to serve, nobody to answer
            await self._let_go(unreadable)
        for i, req in enumerate(taken):
            if req is None:
                continue
            self._taken[req.request_id] = req
            if i in expired:
                answers.append(expiry_answer(req, t, self.params.ttl_s, self.node))
            else:
                out.append(req)
        if src == self.node:
            self.stats.taken_own += len(out)
        else:
            self.stats.stolen += len(out)
        if answers:
            self.stats.expired += len(answers)
            await self.put_results(answers, t)
        return out

    async def _let_go(self, ids: Sequence[str]) -> None:
        """Drop the lease, the in-flight entry and the body of ids just taken whose body does not read (corrupt, or
        written by another version): kept, they came back at every restart and refused their id for good."""
        k = self.keys
        log.warning("%d queued requests with unreadable bodies dropped (first %r)", len(ids), ids[0])
        pipe = self.r.pipeline(transaction=True)
        pipe.hdel(k.lease, *ids)
        pipe.srem(k.inflight(self.node), *ids)
        pipe.hdel(k.body, *ids)
        pipe.hdel(k.sent, *ids)
        await pipe.execute()

    async def _deliver_to(self, origin: str, outs: Sequence[Output], t: float) -> list[str]:
        k = self.keys
        args: list[Any] = [self.node, t, max(self.params.ttl_s, 60.0)]
        for o in outs:
            if not o.served_by:
                o = msgspec.structs.replace(o, served_by=self.node)
            args += [o.request_id, o.seq, 1 if o.finished else 0, _enc.encode(o)]
        flags = await self._deliver(
            keys=[k.lease, k.sent, k.body, k.done, k.resp(origin), k.inflight(self.node), call_key(k.replay)],
            args=args)
        refused: list[str] = []
        for o, flag in zip(outs, flags, strict=True):
            if int(flag) < 0:
                refused.append(o.request_id)
            if o.finished or int(flag) < 0:
                if o.finished and int(flag) > 0:
                    self.stats.served_ids.append(o.request_id)
                self._taken.pop(o.request_id, None)
        return refused
