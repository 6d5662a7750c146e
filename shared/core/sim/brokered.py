"""Virtual-time cluster with a request broker per node (seed 003): ``local``, ``global`` (work stealing),
``splitwise`` (prefill/decode split, or all-mixed "aggregated"), optionally behind a router-side FCFS queue.

The same core decisions as the real brokers: each node's queue is a :class:`LocalBroker` (TTL, max size,
admission by free blocks and token budget); an engine pulls only when its own waiting queue is empty, so the
broker holds the backlog. In ``global`` mode a node whose queue is empty and whose engine has room steals
``steal_size(batch)`` requests from a peer chosen by :func:`choose_victim` (Redis moves them in the real
system; here they move in memory at the same decision points, with no network delay). A killed node's queue
stays stealable until its heartbeat expires (``expire_period_s``), then the lowest-numbered live node
recovers its queued and in-flight requests (the in-flight ones restart from scratch; a client would get no
chunk twice, see ``shared/state/queue.py``). In ``splitwise`` the front assigns nodes by blurred least load
from a view of the nodes' loads refreshed every ``sync_period_s``; prefill engines hand the KV to decode
engines over a :class:`KVLink`. The router-side queue (``router_queue``) is the routing core's flow control
(one tenant, one band, FCFS, the broker's TTL): a request leaves it only while some node has headroom (empty
broker queue, empty engine waiting queue, free blocks) and goes to the preferred (origin) node when it has
room, else to the least-loaded one with room.

Every trace request ends as exactly one of completed, expired, rejected or lost; the result counts them.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from shared.core.engine import Engine, KVLink, Request, SchedulerConfig, StepTimeModel
from shared.core.engine.stats import LogHistogram
from shared.core.queueing import (
    ErrorCode,
    LocalBroker,
    NodeInfo,
    Output,
    PullBudget,
    QueuedRequest,
    SchedulerParams,
    admit,
    assign,
    choose_victim,
    steal_size,
)
from shared.core.roles import NodeRole
from shared.core.routing.domain import RouteRequest
from shared.core.routing.flow_control import FlowConfig, FlowController
from shared.core.sim.workload import TraceRequest

INF = math.inf


@dataclass(frozen=True, slots=True)
class BrokeredSpec:
    """Nodes (one engine each, all the same GPUs), the broker mode (``params.name``) and what sits in front."""

    nodes: int
    config: SchedulerConfig
    step_model: StepTimeModel
    params: SchedulerParams = field(default_factory=SchedulerParams)
    router_queue: bool = False
    skew: float | None = None  # share of arrivals landing on node 0 (rest uniform); None = round robin
    prefill_nodes: int = 0  # splitwise: the first N nodes prefill, the others decode; 0 = all mixed
    kv_link: KVLink | None = None
    reserved_output_blocks: int = 2
    kill: tuple[int, float] | None = None  # (node, time): the node dies then
    seed: int = 0

    def problems(self) -> list[str]:
        """What is wrong with the spec (empty when usable)."""
        out = list(self.params.problems())
        if self.nodes < 1:
            out.append(f"nodes must be >= 1 (got {self.nodes})")
        if self.skew is not None and not 0.0 <= self.skew <= 1.0:
            out.append(f"skew must be in [0, 1] (got {self.skew})")
        if self.prefill_nodes:
            if self.params.name != "splitwise":
                out.append("prefill_nodes needs scheduler_name splitwise")
            elif not 0 < self.prefill_nodes < self.nodes:
                out.append(f"prefill_nodes must leave at least one decode node (got {self.prefill_nodes} of "
                           f"{self.nodes})")
        if self.kill is not None and not 0 <= self.kill[0] < self.nodes:
            out.append(f"kill names node {self.kill[0]}, there are {self.nodes}")
        return out


@dataclass(slots=True)
class Outcome:
    """What happened to one trace request (virtual seconds)."""

    index: int
    arrival: float
    prompt_len: int
    output_len: int
    origin: int = -1
    status: str = "pending"  # completed | expired | rejected | lost
    reason: str = ""
    served_by: int = -1
    decode_by: int = -1
    scheduled: float = -1.0  # first scheduled by the engine that served it (or its prefill)
    first_token: float = -1.0
    finish: float = -1.0
    finals: int = 0  # final answers given (exactly 1 when nothing is served twice)
    runs: int = 0  # times an engine started it (a recovered in-flight request runs again)

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first."""
        return (self.finish - self.first_token) / (self.output_len - 1) if self.output_len > 1 else 0.0


@dataclass(slots=True)
class BrokeredResult:
    """Outcomes, engines and broker counters of one run."""

    outcomes: list[Outcome]
    engines: list[Engine]
    roles: list[NodeRole]
    stolen: int = 0
    recovered: int = 0

    def summary(self, slo_ttft_s: float = 2.0, slo_tpot_s: float = 0.1) -> dict[str, object]:
        """Percentiles, accounting and goodput at an SLO (expired, rejected and lost requests count as misses)."""
        done = [o for o in self.outcomes if o.status == "completed"]
        ttft = np.array([o.first_token - o.arrival for o in done])
        tpot = np.array([o.tpot for o in done if o.output_len > 1])
        queue = np.array([o.scheduled - o.arrival for o in done])
        e2e = np.array([o.finish - o.arrival for o in done])
        itl = LogHistogram()
        for e in self.engines:
            itl.merge(e.stats.itl)
        start = min((o.arrival for o in self.outcomes), default=0.0)
        end = max([o.finish for o in done] + [o.arrival for o in self.outcomes], default=start)
        span = max(end - start, 1e-9)
        good = sum(1 for o in done if o.first_token - o.arrival <= slo_ttft_s and o.tpot <= slo_tpot_s)
        status = {s: sum(1 for o in self.outcomes if o.status == s)
                  for s in ("completed", "expired", "rejected", "lost", "pending")}
        return {
            "requests": len(self.outcomes),
            **status,
            "duplicated": sum(1 for o in self.outcomes if o.finals > 1),
            "stolen": self.stolen,
            "recovered": self.recovered,
            "makespan_s": span,
            "ttft_s": _pct(ttft),
            "tpot_s": _pct(tpot),
            "itl_s": {"p50": itl.quantile(0.5), "p99": itl.quantile(0.99)},
            "queue_s": _pct(queue),
            "e2e_s": _pct(e2e),
            "slo": {"ttft_s": slo_ttft_s, "tpot_s": slo_tpot_s},
            "goodput_rps": good / span,
            "good_fraction": good / len(self.outcomes) if self.outcomes else 0.0,
            "throughput_rps": len(done) / span,
        }


def _pct(a: np.ndarray) -> dict[str, float]:
    if a.size == 0:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"mean": float(a.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(a.max())}


@dataclass(slots=True)
class _Node:
    idx: int
    role: NodeRole
    engine: Engine
    broker: LocalBroker
    alive: bool = True
    recovered: bool = False
    stuck: bool = False  # has work but cannot step (nothing fits, nothing in transfer): skip until a new request
    running: dict[str, Request] = field(default_factory=dict)
    load: int = 0  # splitwise: prompt tokens (P, mixed) or requests (D) assigned and not finished


class _Sim:
    """One run; see the module docstring."""

    def __init__(self, trace: Sequence[TraceRequest], spec: BrokeredSpec) -> None:
        problems = spec.problems()
        if problems:
            raise ValueError("; ".join(problems))
        self.trace, self.spec, self.p = trace, spec, spec.params
        self.rng = random.Random(spec.seed)
        self.nodes: list[_Node] = []
        for k in range(spec.nodes):
            role = NodeRole.MIXED
            if spec.prefill_nodes:
                role = NodeRole.PREFILL if k < spec.prefill_nodes else NodeRole.DECODE
            cfg = _with_role(spec.config, role)
            eng = Engine(cfg, spec.step_model, fast_forward=False, kv_link=spec.kv_link)
            self.nodes.append(_Node(k, role, eng, LocalBroker(self.p, node=str(k))))
        self.out = [Outcome(i, tr.arrival_s, tr.prompt_len, tr.output_len) for i, tr in enumerate(trace)]
        # router-side queue: the routing core's flow control (one tenant, one band, FCFS, the broker's TTL)
        self.flow = FlowController(FlowConfig(ttl_s=self.p.ttl_s, max_queued=1 << 30, max_queued_per_band=1 << 30))
        self.held: dict[str, QueuedRequest] = {}
        self.decode_of: dict[str, int] = {}
        self.handoffs: list[tuple[float, int, int, Request]] = []  # (ready_at, seq, decode node, request)
        self.view: list[NodeInfo] = []
        self.view_at = -INF
        self.rr = 0
        self.seq = 0
        self.stolen = 0
        self.recovered = 0
        self.kill_at = spec.kill[1] if spec.kill else INF
        self.recover_at = INF

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self) -> BrokeredResult:
        trace, i, n = self.trace, 0, len(self.trace)
        while True:
            t_arr = trace[i].arrival_s if i < n else INF
            node, t_eng = None, INF
            for nd in self.nodes:
                if nd.alive and not nd.stuck:
                    t_nd = self._next_time(nd)
                    if t_nd < t_eng:
                        node, t_eng = nd, t_nd
            t_hand = self.handoffs[0][0] if self.handoffs else INF
            t = min(t_arr, t_eng, t_hand, self.kill_at, self.recover_at)
            if t == INF:
                break
            if t == self.kill_at:
                self._kill(t)
            elif t == self.recover_at:
                self._recover(t)
            elif t == t_arr:
                self._arrive(i, t)
                i += 1
            elif t == t_hand:
                _, _, k, req = heapq.heappop(self.handoffs)
                self._start(self.nodes[k], req, t)
            else:
                assert node is not None
                self._step(node)
        self._finish_leftovers()
        return BrokeredResult(self.out, [nd.engine for nd in self.nodes], [nd.role for nd in self.nodes],
                              self.stolen, self.recovered)

    def _arrive(self, i: int, t: float) -> None:
        tr = self.trace[i]
        origin = self._origin()
        self.out[i].origin = origin
        q = QueuedRequest(request_id=str(i), prompt_len=tr.prompt_len, max_tokens=tr.output_len, arrival_s=t,
                          origin=str(origin))
        if self.spec.router_queue:
            refusal = self.flow.enqueue(RouteRequest(request_id=q.request_id, model="sim",
                                                     prompt_tokens=q.prompt_len), t)
            if refusal is not None:
                o = self.out[i]
                o.status, o.reason, o.finals = "rejected", refusal.reason, o.finals + 1
            else:
                self.held[q.request_id] = q
                self._dispatch_router(t)
        elif self.p.name == "splitwise":
            self._front(q, t)
        else:
            self._put(self.nodes[origin], q, t)
        for nd in self.nodes:
            if nd.alive and not nd.engine.has_work():
                self._pull(nd, t)

    def _origin(self) -> int:
        """The node a request lands on (holding its client); a dead node's share fails over to the live ones."""
        s, n = self.spec.skew, self.spec.nodes
        if s is None or n == 1:
            k = self.rr % n
            self.rr += 1
        else:
            k = 0 if self.rng.random() < s else 1 + self.rng.randrange(n - 1)
        if not self.nodes[k].alive:
            live = [nd.idx for nd in self.nodes if nd.alive]
            k = live[self.rr % len(live)] if live else k
            self.rr += 1
        return k

    def _put(self, nd: _Node, q: QueuedRequest, t: float) -> bool:
        [(_, why)] = nd.broker.put_requests([q], t)
        if why is not None:
            o = self.out[int(q.request_id)]
            o.status, o.reason, o.finals = "rejected", why, o.finals + 1
            return False
        return True

    def _next_time(self, nd: _Node) -> float:
        """When the node next has something to do: its next step, or the end of a KV send that blocks a pull."""
        eng = nd.engine
        if eng.has_work():
            return eng.now
        if nd.broker.unhandled() and nd.role is not NodeRole.DECODE:
            wake = eng.scheduler.next_wakeup()
            if wake is not None:
                return max(eng.now, wake)
        return INF

    def _step(self, nd: _Node) -> None:
        eng = nd.engine
        eng.now = max(eng.now, self._next_time(nd))
        self._pull(nd, eng.now)
        res = eng.step()
        for r in res.finished:
            self._finished(nd, r, eng.now)
        added = self._pull(nd, eng.now)  # room this step freed (finished requests, KV sent)
        if not res.output.scheduled and not res.output.preempted and not added:
            wake = eng.scheduler.next_wakeup()
            if wake is not None and wake > eng.now:
                eng.now = wake
            elif wake is None and eng.has_work():
                nd.stuck = True
        if self.spec.router_queue:
            self._dispatch_router(eng.now)

    # -- pulls and stealing --------------------------------------------------------------------------------
    def _budget(self, nd: _Node) -> PullBudget:
        s = nd.engine.scheduler
        cfg = s.config
        return PullBudget(available_blocks=s.kv.num_free, block_size=cfg.block_size,
                          reserved_output_blocks=self.spec.reserved_output_blocks,
                          max_num_batched_tokens=cfg.max_num_batched_tokens,
                          batch=cfg.max_num_seqs - len(s.running) - len(s.waiting),
                          total_blocks=cfg.num_gpu_blocks - 1)  # one past it is rejected, not left at the head

    def _pull(self, nd: _Node, t: float) -> int:
        """Hand the node's engine what fits from its queue (or stolen); how many requests it got."""
        if not nd.alive or nd.role is NodeRole.DECODE or len(nd.engine.scheduler.waiting):
            return 0
        budget = self._budget(nd)
        if budget.empty:
            return 0
        got = nd.broker.get_requests(budget, t)
        self._collect(nd, t)
        if not got and self.p.name == "global" and nd.broker.unhandled() == 0:
            got = self._steal(nd, budget, t)
        for q in got:
            tr = self.trace[int(q.request_id)]
            max_tokens = 1 if nd.role is NodeRole.PREFILL else tr.output_len
            self._start(nd, Request(q.request_id, prompt_len=tr.prompt_len, prefix_ids=tr.prefix_ids,
                                    prefix_unit=tr.prefix_unit, max_tokens=max_tokens, ignore_eos=True,
                                    arrival_time=self.out[int(q.request_id)].arrival), t)
        return len(got)

    def _steal(self, nd: _Node, budget: PullBudget, t: float) -> list[QueuedRequest]:
        peers = [(str(o.idx), float(o.broker.unhandled())) for o in self.nodes if not o.recovered and o is not nd]
        victim = choose_victim(peers, str(nd.idx), self.p.min_load_score, self.rng)
        if victim is None:
            return []
        v = self.nodes[int(victim)]
        v.broker.expire(t)
        self._collect(v, t)
        k = admit(v.broker.head(steal_size(budget.batch)), budget)
        got = v.broker.release(k)
        self.stolen += len(got)
        return got

    def _start(self, nd: _Node, req: Request, t: float) -> None:
        eng = nd.engine
        if eng.now < t:
            eng.now = t
        o = self.out[int(req.req_id)]
        try:
            eng.add_request(req)
        except ValueError as err:
            o.status, o.reason, o.finals = "rejected", str(err), o.finals + 1
            return
        nd.running[req.req_id] = req
        nd.stuck = False
        o.runs += 1
        if nd.role is NodeRole.DECODE:
            o.decode_by = nd.idx
        else:
            o.served_by = nd.idx

    def _collect(self, nd: _Node, t: float) -> None:
        """Expiry answers the node's broker produced."""
        for rid, outs in nd.broker.get_results(t).items():
            for out in outs:
                if out.error_code == ErrorCode.EXPIRED:
                    o = self.out[int(rid)]
                    o.status, o.reason, o.finals = "expired", out.error, o.finals + 1

    # -- finishing ------------------------------------------------------------------------------------------
    def _finished(self, nd: _Node, r: Request, t: float) -> None:
        nd.running.pop(r.req_id, None)
        o = self.out[int(r.req_id)]
        origin = self.nodes[o.origin] if o.origin >= 0 else None
        if origin is not None and origin.broker.has_request(r.req_id):
            origin.broker.put_results([Output(request_id=r.req_id, seq=0, finished=True)])
        if nd.role is not NodeRole.DECODE:
            if o.scheduled < 0 or o.runs > 1:
                o.scheduled = r.first_scheduled_time
            if o.first_token < 0:
                o.first_token = r.first_token_time
        if nd.role is NodeRole.PREFILL:
            nd.load -= r.prompt_len
            if o.output_len > 1 and r.kv_handoff is not None:
                d = self.decode_of[r.req_id]
                tr = self.trace[o.index]
                dreq = Request(r.req_id, prompt_len=tr.prompt_len, max_tokens=o.output_len - 1, ignore_eos=True,
                               remote_prefill=True, arrival_time=r.kv_handoff.ready_at)
                self.seq += 1
                heapq.heappush(self.handoffs, (r.kv_handoff.ready_at, self.seq, d, dreq))
                return
        elif nd.role is NodeRole.DECODE:
            nd.load -= 1
        else:
            nd.load -= r.prompt_len
        o.finish = t
        o.status = "completed"
        o.finals += 1

    # -- splitwise front ----------------------------------------------------------------------------------
    def _front(self, q: QueuedRequest, t: float) -> None:
        if t - self.view_at >= self.p.sync_period_s:
            self.view = [NodeInfo(node=str(nd.idx), role=nd.role, load=nd.load, ts=t) for nd in self.nodes
                         if nd.alive]
            self.view_at = t
        a = assign(q.prompt_len, self.view, self.rng)
        if a is None:
            o = self.out[int(q.request_id)]
            o.status, o.reason, o.finals = "rejected", "no live prefill and decode node", o.finals + 1
            return
        p = self.nodes[int(a.prefill)]
        if not self._put(p, q, t):
            return
        p.load += q.prompt_len if p.role.prefills else 1
        if a.decode is not None:
            d = self.nodes[int(a.decode)]
            self.decode_of[q.request_id] = d.idx
            d.load += 1

    # -- router-side queue --------------------------------------------------------------------------------
    def _has_room(self, nd: _Node) -> bool:
        s = nd.engine.scheduler
        return (nd.alive and nd.role is not NodeRole.DECODE and nd.broker.unhandled() == 0 and not len(s.waiting)
                and not self._budget(nd).empty)

    def _dispatch_router(self, t: float) -> None:
        for refusal in self.flow.expire(t):
            self.held.pop(refusal.request_id, None)
            o = self.out[int(refusal.request_id)]
            o.status, o.reason, o.finals = "expired", refusal.reason, o.finals + 1
        while len(self.flow):
            room = [nd for nd in self.nodes if self._has_room(nd)]
            if not room:
                return
            rr = self.flow.pop()
            if rr is None:
                return
            q = self.held.pop(rr.request_id)
            pref = self.nodes[int(q.origin)]
            target = pref if pref in room else min(room, key=lambda nd: (nd.engine.num_outstanding, nd.idx))
            if self._put(target, q, t):
                self._pull(target, t)

    # -- failures -----------------------------------------------------------------------------------------
    def _kill(self, t: float) -> None:
        assert self.spec.kill is not None
        nd = self.nodes[self.spec.kill[0]]
        nd.alive = False
        self.kill_at = INF
        self.recover_at = t + self.p.expire_period_s if self.p.name == "global" else INF
        if self.p.name != "global":
            for rid in list(nd.running) + [q.request_id for q in nd.broker.head(1 << 30)]:
                o = self.out[int(rid)]
                if o.status == "pending":
                    o.status, o.reason = "lost", f"node {nd.idx} died (no recovery in {self.p.name} mode)"

    def _recover(self, t: float) -> None:
        self.recover_at = INF
        dead = next(nd for nd in self.nodes if not nd.alive and not nd.recovered)
        dead.recovered = True
        live = [nd for nd in self.nodes if nd.alive]
        if not live:
            return
        heir = live[0]
        flying = [QueuedRequest(request_id=rid, prompt_len=r.prompt_len, max_tokens=r.max_tokens,
                                arrival_s=self.out[int(rid)].arrival, origin=str(self.out[int(rid)].origin))
                  for rid, r in dead.running.items()]
        queued = dead.broker.release(1 << 30)
        self.recovered += heir.broker.adopt(flying + queued)
        dead.running.clear()
        for nd in live:
            if not nd.engine.has_work():
                self._pull(nd, t)

    def _finish_leftovers(self) -> None:
        for nd in self.nodes:
            if not nd.alive:
                continue  # what a dead, unrecovered node held is lost (marked so when it died)
            nd.broker.expire(INF)
            self._collect(nd, INF)
        for rid in self.held:
            o = self.out[int(rid)]
            o.status, o.reason, o.finals = "expired", "never dispatched by the router queue", o.finals + 1


def _with_role(cfg: SchedulerConfig, role: NodeRole) -> SchedulerConfig:
    from dataclasses import replace

    return replace(cfg, role=role)


def simulate_brokered(trace: Sequence[TraceRequest], spec: BrokeredSpec) -> BrokeredResult:
    """Replay ``trace`` (sorted by arrival) on ``spec.nodes`` brokered engines in virtual time."""
    return _Sim(trace, spec).run()
