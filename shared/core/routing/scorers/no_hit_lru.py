"""no-hit-lru-scorer (llm-d): spreads *new* prefixes. For a cold request (no endpoint holds any of its
blocks; with ``cold_below`` > 0, also when the best holder has less than that fraction of its blocks)
endpoints that never took a cold request score 1.0, the others by recency of their last cold request,
linearly from 1 (least recent) down to 0 (most recent); warm requests score a neutral 0.5. The recency
list holds at most ``lru_size`` endpoints (llm-d 1024) and learns only from acted decisions.

Why ``cold_below``: with llm-d's rule a prompt is cold only when no block at all is cached anywhere, but chat
prompts share their first block(s) (the template, a common preamble), so after the first requests nothing is
cold and new prefixes are no longer spread (seen on the gateway bench: 128 prefix groups piled onto one of 3
engines and evicted each other). sglang-router's cache_aware treats a match below ``cache_threshold`` (0.3)
as new for the same reason.

Why ``prefer_partial``: spreading only has to keep consecutive new prefixes off one endpoint. A cold prompt
that still shares some leading blocks with an endpoint (a variant of a system prompt, a family of
preambles) computes fewer tokens there, so the endpoints holding its longest partial match score 1.0 and the
others half their recency score, unless the holder took the last cold request itself (then spreading wins)
or its cache is nearly full (``partial_room`` of its blocks hold cached content, by its KV events): then the
new prefix would evict others there, and spreading wins again. Load still decides between them through the
other scorers. In virtual time (``bench/gateway_vs_sglang.py``'s workload replayed on the engine emulator,
seeds 0-2, 40 s) it gains 2-7 blocks at 32 groups (hit rate +0.7e-4 to +1.1e-4) and moves the 128-group
hit rate by -1.2, -0.7 and +0.3 points: there the caches overflow and group placement is chaotic.

Why ``idle_first``: a cold prompt is a long prefill, and on an endpoint that is running anything it starts
only after the step in flight (a decode step: several ms) and then shares its steps with the running decodes.
On an idle endpoint it starts at once. So when some endpoints are idle and others not, the idle ones lead: the
score is ``(1 - idle_first) × recency + idle_first`` for them and ``(1 - idle_first) × recency`` for the others
(above 0.5, every idle endpoint outranks every busy one). Idle: nothing in flight from this router, nothing running
or waiting by the endpoint's last report (which covers other router replicas and clients, where the router's own
count covers what the report is too old to show), and not failing (a request failed there in the last
``FAILED_HOLD_S``, 10 s, and none succeeded since): an engine that fails every request at once is never busy, and
without that it drew nearly every cold prompt. A qualifying partial holder still leads (its
blocks are a hit), and before any cold request was taken it leads too. On the gateway bench's 128-group workload
in virtual time (``bench/gateway_sim.py``, 30 seeds) the exact TTFT p90 fell from 26.1 to 25.0 ms, under the
sglang-router model's 25.9 ms in 30 of 30 seeds (12 of 30 before): the requests above the p90 there are cold
prefills, and what they waited for was the step in flight. With ``partial_room`` 0.9 the holder preference outlived
the point where it pays (a holder half full of other prefixes evicts them for one shared block) and kept the idle
rule from cold prompts: 0.5 (the 128-group hit rate rose from 0.628 to 0.630; at 32 groups, where caches stay a
quarter full, nothing changes). docs/gateway.md has the figures, Mooncake's included. For a LoRA request, when
some endpoint has its adapter active, only idle endpoints with it active lead: an idle one without it would first
load the adapter (and may evict another one); before this, the idle lead outweighed the LoRA affinity scorer and
sent such prompts to idle engines without the adapter even when its holder ran a single request.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import msgspec
import numpy as np
import numpy.typing as npt

from shared.core.routing.cycle import PREFIX_SOURCES, Cycle, wide
from shared.core.routing.domain import FAILED_HOLD_S, EndpointState
from shared.core.routing.plugin import Scorer, Scores

NEUTRAL = 0.5


class NoHitParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``lru_size``: endpoints remembered; ``source``: the index that decides "cold"; ``cold_below``: a request
    is also cold when its best holder has less than this fraction of its blocks (0: only when none has any)."""

    lru_size: int = 1024
    source: str = "hybrid"
    cold_below: float = 0.0
    prefer_partial: bool = True  # a cold request's longest partial holder leads (unless it took the last one)
    partial_room: float = 0.5  # ... and only while less than this fraction of the holder's KV blocks is cached
    idle_first: float = 0.6  # an idle endpoint's lead for a cold request (0: recency alone; > 0.5: ahead of all busy)


class NoHitLruScorer(Scorer):
    """Cold requests go to the endpoint that least recently took a cold request."""

    type_name = "no-hit-lru-scorer"
    Params = NoHitParams

    def __init__(self, name: str, params: msgspec.Struct) -> None:
        super().__init__(name, params)
        self._recent: OrderedDict[str, None] = OrderedDict()  # least recent first

    @classmethod
    def check(cls, params: msgspec.Struct) -> list[str]:
        """Ranges."""
        assert isinstance(params, NoHitParams)
        out = []
        if params.lru_size < 1:
            out.append(f"lru_size must be >= 1 (got {params.lru_size})")
        if not 0 < params.partial_room <= 1:
            out.append(f"partial_room must be in (0, 1] (got {params.partial_room})")
        if not 0 <= params.idle_first <= 1:
            out.append(f"idle_first must be in [0, 1] (got {params.idle_first})")
        if not 0 <= params.cold_below <= 1:
            out.append(f"cold_below must be in [0, 1] (got {params.cold_below})")
        if params.source not in PREFIX_SOURCES:
            out.append(f"source must be one of {', '.join(PREFIX_SOURCES)} (got {params.source!r})")
        return out

    def _cold(self, cycle: Cycle) -> bool:
        assert isinstance(self.params, NoHitParams)
        m = cycle.matches(self.params.source)
        if not m:
            return True
        below, total = self.params.cold_below, cycle.chain.total
        return below > 0 and total > 0 and max(m.values()) < below * total

    def score(self, cycle: Cycle, cands: list[EndpointState]) -> Scores | None:
        """1 for never-used, else by recency; a partial holder or else an idle endpoint leads; warm: None. Arrays
        over the pool's columns when nothing was filtered (a cold prompt over 10,000 endpoints walks only the
        endpoints that took cold prompts and the partial holders in Python)."""
        if not self._cold(cycle):
            return None
        assert isinstance(self.params, NoHitParams)
        if not wide(len(cands)):
            return self._score_each(cycle, cands)
        out = self._recency(cycle, cands)
        if self.params.prefer_partial:
            holders = self._partial_holders(cycle, cands)
            if holders.any():  # the holder leads; the others keep their order, half as strong
                return np.where(holders, 1.0, out / 2)
        f = self.params.idle_first
        if f > 0:
            idle = _idle(cycle, cands)
            if (adapter := cycle.request.lora) and idle.any():
                idle = _ready(idle, cands, adapter)
            if idle.any() and not idle.all():
                return (1 - f) * out + np.where(idle, f, 0.0)
        return out if self._recent else None  # nobody took a cold request yet: the same for all

    def _score_each(self, cycle: Cycle, cands: list[EndpointState]) -> list[float] | None:
        """``score`` for a short list, endpoint by endpoint (``COLUMNS_FROM``: the same numbers, fewer calls)."""
        assert isinstance(self.params, NoHitParams)
        rank = {eid: i for i, eid in enumerate(self._recent)}  # 0 = least recent
        top = max(len(rank) - 1, 1)
        out = [1.0 if (r := rank.get(st.id)) is None else 1.0 - r / top for st in cands]
        if self.params.prefer_partial:
            m = cycle.matches(self.params.source)
            best = max((m.get(st.slot, 0) for st in cands), default=0)
            if best > 0:
                last = next(reversed(self._recent), None)
                room, precise = self.params.partial_room, cycle.state.precise
                holders = [m.get(st.slot, 0) == best and st.id != last
                           and precise.blocks_of(st.slot) < room * (st.endpoint.num_gpu_blocks or 1 << 62)
                           for st in cands]
                if any(holders):
                    return [1.0 if h else v / 2 for h, v in zip(holders, out, strict=True)]
        f = self.params.idle_first
        if f > 0:
            idle = [_idle_one(st, cycle.now) for st in cands]
            if (adapter := cycle.request.lora) and any(idle):
                active = [st.metrics is not None and adapter in st.metrics.active_loras for st in cands]
                if any(active):
                    idle = [i and a for i, a in zip(idle, active, strict=True)]
            if any(idle) and not all(idle):
                return [(1 - f) * v + (f if i else 0.0) for i, v in zip(idle, out, strict=True)]
        return out if self._recent else None

    def _recency(self, cycle: Cycle, cands: list[EndpointState]) -> npt.NDArray[np.float64]:
        """1 for an endpoint that never took a cold request, else 1 (least recent) .. 0 (most recent)."""
        out = np.ones(len(cands))
        if not self._recent:
            return out
        top = max(len(self._recent) - 1, 1)
        state = cycle.state
        where: dict[int, int] = state.columns(cycle.request.model).position  # slot → pool position
        inv = None  # pool position → index in ``cands`` (a sub-list of the pool)
        if cands is not state.pool(cycle.request.model) and (inv := cycle.inverse(cands)) is None:
            where = {st.slot: i for i, st in enumerate(cands)}  # not a sub-list of the pool: by slot
        endpoints = state.endpoints
        for r, eid in enumerate(self._recent):  # 0 = least recent
            st = endpoints.get(eid)
            if st is None or (i := where.get(st.slot)) is None:
                continue
            if inv is not None and (i := int(inv[i])) < 0:
                continue
            out[i] = 1.0 - r / top
        return out

    def _partial_holders(self, cycle: Cycle, cands: list[EndpointState]) -> npt.NDArray[np.bool_]:
        """Endpoints holding the longest partial prefix that did not take the last cold request and have room."""
        assert isinstance(self.params, NoHitParams)
        out = np.zeros(len(cands), dtype=np.bool_)
        idx, blocks = cycle.holders(cands, self.params.source)
        if not len(blocks) or (best := blocks.max()) <= 0:
            return out
        last = next(reversed(self._recent), None)
        room = self.params.partial_room
        precise = cycle.state.precise
        for i in idx[blocks == best].tolist():
            st = cands[i]
            out[i] = st.id != last and precise.blocks_of(st.slot) < room * (st.endpoint.num_gpu_blocks or 1 << 62)
        return out

    def picked(self, cycle: Cycle, endpoint: EndpointState) -> None:
        """A cold request went to ``endpoint``: it becomes the most recent."""
        if not self._cold(cycle):
            return
        assert isinstance(self.params, NoHitParams)
        recent = self._recent
        recent.pop(endpoint.id, None)
        recent[endpoint.id] = None
        while len(recent) > self.params.lru_size:
            recent.popitem(last=False)


def _ready(idle: npt.NDArray[np.bool_], cands: list[EndpointState], adapter: str) -> npt.NDArray[np.bool_]:
    """For a LoRA request, only idle endpoints with the adapter active lead when any endpoint has it active: an idle
    one without it would load it (and may evict another adapter) before the prefill starts."""
    active = np.fromiter((st.metrics is not None and adapter in st.metrics.active_loras for st in cands), np.bool_,
                         len(cands))
    if not active.any():
        return idle  # every endpoint would load it: idleness alone decides
    return idle & active


def _idle_one(st: EndpointState, now: float) -> bool:
    """``_idle`` of one endpoint."""
    m = st.metrics
    return st.inflight_requests == 0 and (m is None or m.running + m.waiting == 0) and not st.failing(now)


def _idle(cycle: Cycle, cands: list[EndpointState]) -> npt.NDArray[np.bool_]:
    """Per candidate: nothing in flight from this router and, by the last report (if any), nothing running or
    waiting; and not failing (an engine that fails every request at once is never busy, and would draw every cold
    prompt). ``EndpointState.failing``, from the pool's columns."""
    requests, busy = cycle.column(cands, "requests"), cycle.column(cands, "busy")
    failed_at = cycle.column(cands, "failed_at")
    if requests is None or busy is None or failed_at is None:  # not a sub-list of the pool: each endpoint
        n = len(cands)
        requests = np.fromiter((st.inflight_requests for st in cands), np.float64, n)
        busy = np.fromiter((m.running + m.waiting if (m := st.metrics) is not None else 0 for st in cands),
                           np.float64, n)
        failed_at = np.fromiter((math.nan if (f := st.failed_at) is None else f for st in cands), np.float64, n)
    with np.errstate(invalid="ignore"):  # NaN (never failed, or served since) compares False: not failing
        failing = np.abs(cycle.now - failed_at) < FAILED_HOLD_S
    out: npt.NDArray[np.bool_] = (requests == 0) & (busy == 0) & ~failing
    return out
