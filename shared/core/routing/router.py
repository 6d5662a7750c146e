"""The router: admission, the profile handler, shadow profiles and the commit of a decision.

``route(request, now)`` is the whole decision (pure; ``now`` is the caller's clock). On a decision it
commits by default: the request counts as in flight on the chosen endpoint with its uncached prompt
tokens, the acting plugins learn (``picked``), and the chosen endpoint is assumed to hold the prompt's
blocks (approximate index). That last step (hashing the rest of the prompt, inserting up to
``max_prefix_blocks`` hashes) is the most expensive part of a commit, so it is queued and applied by
``flush()``, which a service calls after sending its reply (llm-d inserts from a goroutine for the same
reason); ``route`` flushes first, so the next decision always sees it. The caller then reports
``first_token`` and ``finished`` (idempotent), and feeds ``update_metrics`` / ``apply_kv_events`` /
``set_endpoints`` as events arrive.
"""

from __future__ import annotations

import random
from itertools import compress
from typing import Any

import numpy.typing as npt

from shared.core.kv_events import KVEventBatch
from shared.core.routing.cycle import Cycle, wide
from shared.core.routing.domain import (
    NO_ENDPOINT,
    SHED,
    Decision,
    Endpoint,
    EndpointMetrics,
    EndpointState,
    Outcome,
    Refusal,
    RouteRequest,
)
from shared.core.routing.flow_control import FlowConfig, FlowController
from shared.core.routing.handlers import HANDLERS, Handler
from shared.core.routing.profile import Profile, RouterConfig, build_plugins, build_profiles
from shared.core.routing.saturation import UtilizationDetector
from shared.core.routing.shadow import ShadowStats
from shared.core.routing.state import DataConfig, PoolState

PREFILL_SUFFIX = "#prefill"  # in-flight key of a disaggregated request's prefill leg


NO_ROOM = Refusal("", 0, "no endpoint with room takes this request")
"""``route(..., with_room=True)``'s answer when the profile's filters drop every endpoint with room: flow control
keeps the request waiting (never given to a client)."""


class Router:
    """A configured routing core over one pool state."""

    def __init__(self, config: RouterConfig, state: PoolState | None = None, seed: int = 0) -> None:
        d = config.data
        data = DataConfig(block_size=d.block_size, max_prefix_blocks=d.max_prefix_blocks,
                          approx_capacity=d.approx_capacity, speculative_capacity=d.speculative_capacity,
                          precise_slack=d.precise_slack, staleness_s=d.staleness_s,
                          hash_memo_chunks=d.hash_memo_chunks)
        problems = [f"data: {p}" for p in data.problems()]
        problems += [f"admission: {p}" for p in config.admission.detector.problems()]
        plugins, errs = build_plugins(config)
        problems += errs
        profiles, errs = build_profiles(config, plugins)
        problems += errs
        handler: Handler | None = None
        if not errs:
            handler, errs = HANDLERS[config.handler.type].build(config.handler.parameters, profiles)
            problems += errs
        problems += [f"shadow: no profile named {n!r}" for n in config.shadow if n not in profiles]
        fc = config.flow_control
        flow = FlowConfig(max_queued=fc.max_queued, max_queued_per_band=fc.max_queued_per_band, ttl_s=fc.ttl_s,
                          ordering=fc.ordering, fairness=fc.fairness)
        problems += [f"flow_control: {p}" for p in flow.problems()]
        if fc.max_inflight_per_endpoint < 1:
            problems.append("flow_control: max_inflight_per_endpoint must be >= 1")
        if problems:
            raise ValueError(f"router config {config.name!r}: " + "; ".join(problems))
        assert handler is not None
        self.config = config
        self.state = state if state is not None else PoolState(data)
        sources = {getattr(p.params, "source", None) for p in plugins.values()}
        sources |= {getattr(handler.params, "source", None)}
        # feed only the assumed-state indexes some plugin reads (each costs an insertion per decision)
        hybrid = "hybrid" in sources
        self.state.track_speculative = hybrid
        # the hybrid source falls back on the decision memory for prompts no engine reports; a speculative
        # index as large as that memory already holds the same decisions, so only a smaller one needs it
        self.state.hybrid_fallback = hybrid and self.state.speculative.capacity < self.state.approx.capacity
        self.state.track_approx = "approximate" in sources or self.state.hybrid_fallback
        # the index that estimates a dispatched request's uncached tokens (in-flight token accounting)
        self.accounting_source = ("hybrid" if self.state.track_speculative else
                                  "approximate" if self.state.track_approx else "precise")
        self.profiles = profiles
        self.handler = handler
        self.detector = UtilizationDetector(config.admission.detector)
        self.shadow_stats: dict[str, ShadowStats] = {n: ShadowStats() for n in config.shadow}
        self._shadows: list[Profile] = [profiles[n] for n in config.shadow]
        self.rng = random.Random(seed)
        self.last_cycle: Cycle | None = None
        self._flow_config = flow
        self._flows: dict[str, FlowController] = {}
        self._pending: list[tuple[str, Cycle]] = []

    # -- events ---------------------------------------------------------------------------------------
    def set_endpoints(self, endpoints: list[Endpoint]) -> None:
        """The pool is exactly these endpoints (from placement)."""
        self.state.set_endpoints(endpoints)

    def update_metrics(self, endpoint_id: str, metrics: EndpointMetrics) -> bool:
        """An engine state report."""
        return self.state.update_metrics(endpoint_id, metrics)

    def apply_kv_events(self, endpoint_id: str, batch: KVEventBatch) -> int:
        """An engine's KV events."""
        return self.state.apply_kv_events(endpoint_id, batch)

    def first_token(self, request_id: str) -> None:
        """The request's first token was seen."""
        self.state.first_token(request_id)
        self.state.first_token(request_id + PREFILL_SUFFIX)
        self.state.finished(request_id + PREFILL_SUFFIX)

    def finished(self, request_id: str, ok: bool | None = None, now: float | None = None) -> None:
        """The request ended (any way); ``ok``: its endpoint answered it (True), failed it (False: an error answer
        or none), or not known (None). A P/D request that failed before its first token failed on its prefill leg
        (the decode endpoint's part had not begun); after it, on the decode endpoint. ``now``: when (the caller's
        clock; by default the newest dispatch), which dates a failure."""
        prefill = request_id + PREFILL_SUFFIX
        if ok is False and self.state.flying(prefill):
            self.state.finished(prefill, False, now)
            self.state.finished(request_id)
            return
        self.state.finished(prefill, ok, now)
        self.state.finished(request_id, ok, now)

    def expire_flights(self, now: float, max_age_s: float, keep: int) -> list[str]:
        """Count as finished the requests in flight longer than ``max_age_s`` and the oldest past ``keep``
        (their ends were lost or never reported); returns their ids (a P/D prefill leg under its own key)."""
        return self.state.expire_flights(now - max_age_s, keep)

    # -- flow control ---------------------------------------------------------------------------------
    def flow(self, model: str) -> FlowController:
        """The queues of ``model``'s pool."""
        fc = self._flows.get(model)
        if fc is None:
            fc = self._flows[model] = FlowController(self._flow_config)
        return fc

    def has_headroom(self, model: str, now: float) -> bool:
        """Some endpoint of the pool is neither saturated (detector) nor at the in-flight cap."""
        return bool(self._with_room(self.state.working(self.state.pool(model), now), now, first=True))

    def _with_room(self, pool: list[EndpointState], now: float, first: bool = False) -> list[EndpointState]:
        """The endpoints of ``pool`` neither saturated nor at the in-flight cap (``first``: stop at the first)."""
        if not pool:
            return []
        cap = self.config.flow_control.max_inflight_per_endpoint
        model = pool[0].endpoint.model
        whole = pool is self.state.pool(model)
        cols = self.state.columns(model) if wide(len(pool)) else None
        pos = None if cols is None or whole else cols.positions(pool)
        if cols is None or (pos is None and not whole):  # short, or not a sub-list of the pool: each endpoint
            sat = self.detector.saturated
            return [st for st in pool if st.inflight_requests < cap and not sat(st, now)][:1 if first else None]

        def at(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
            return a if pos is None else a[pos]
        room = (at(cols.requests) < cap) & ~self.detector.saturated_columns(at(cols.ts), at(cols.waiting),
                                                                           at(cols.kv_usage), now)
        if first:
            return [pool[int(room.argmax())]] if room.any() else []
        return list(compress(pool, room.tolist()))

    def submit(self, request: RouteRequest, now: float) -> Outcome | None:
        """Route now, or queue (None) when flow control is on and the pool has no headroom or a queue ahead.

        Sheddable requests are never queued: they are routed (and shed with 429 under saturation).
        """
        if not self.config.flow_control.enabled or request.sheddable or not self.state.pool(request.model):
            return self.route(request, now)
        fc = self.flow(request.model)
        if not len(fc) and self.has_headroom(request.model, now):
            out = self.route(request, now, with_room=True)
            if out is not NO_ROOM:
                return out
        return fc.enqueue(request, now)

    def dispatch(self, now: float) -> list[Outcome]:
        """Expire overdue requests, then route queued ones while their pool has headroom (late binding)."""
        out: list[Outcome] = []
        for model, fc in self._flows.items():
            out += fc.expire(now)
            tries = len(fc)  # each waiting request is tried once a call: one that no endpoint with room takes waits
            while tries and self.has_headroom(model, now):
                tries -= 1
                req = fc.pop()
                if req is None:
                    break
                got = self.route(req, now, with_room=True)
                if got is NO_ROOM:
                    fc.putback()
                else:
                    out.append(got)
        return out

    def queued(self) -> int:
        """Requests waiting in flow control, all pools."""
        return sum(len(fc) for fc in self._flows.values())

    # -- decisions ------------------------------------------------------------------------------------
    def route(self, request: RouteRequest, now: float, *, commit: bool = True, explain: bool = False,
              with_room: bool = False) -> Outcome:
        """Decide where ``request`` goes at ``now`` (``with_room``: among the endpoints with headroom only, as flow
        control dispatches: the endpoint with room opens the gate, so it must be where the request may go)."""
        if self._pending:
            self.flush()
        pool = self.state.pool(request.model)
        if not pool:
            return Refusal(request.request_id, NO_ENDPOINT, f"no endpoint serves model {request.model!r}")
        if request.subset is not None:
            pool = [st for st in pool if st.endpoint.id in request.subset]
            if not pool:
                why = f"no endpoint of the request's subset ({len(request.subset)}) serves model {request.model!r}"
                return Refusal(request.request_id, NO_ENDPOINT, why)
        whole, pool = pool, self.state.working(pool, now)  # an endpoint failing request after request takes none
        if with_room and self.config.handler.type == "single":
            # (P/D is left whole: its prefill and decode endpoints have room of their own; narrowed, a pool whose room
            # was all on the prefill side refused every request at the decode profile's role filter)
            roomy = self._with_room(pool, now)
            # the room that opened the gate is on the broken endpoints only, or outside the request's subset: routed
            # past the others' cap, it piled up
            if not roomy and (len(pool) < len(whole) or request.subset is not None):
                return NO_ROOM
            if roomy and len(roomy) < len(pool):
                got = self._decide(request, roomy, now, commit, explain)
                # the profile's own filters dropped every endpoint with room (a LoRA, a label): it waits for room it
                # can use (routed to the busy ones, it piled onto them past their cap; refused, it was a 503)
                return got if isinstance(got, Decision) else NO_ROOM
        adm = self.config.admission
        if request.sheddable and adm.shed_sheddable:
            sat = self.detector.pool(pool, now)
            if sat >= 1.0:
                return Refusal(request.request_id, SHED, f"pool of {request.model!r} saturated ({sat:.2f} >= 1), "
                                                         f"sheddable request (priority {request.priority}) dropped")
        got = self._decide(request, pool, now, commit, explain)
        if isinstance(got, Refusal) and len(pool) < len(whole):  # e.g. a P/D role left with its broken ones only
            return self._decide(request, whole, now, commit, explain)
        return got

    def _decide(self, request: RouteRequest, pool: list[EndpointState], now: float, commit: bool,
                explain: bool) -> Outcome:
        """The handler's decision over ``pool`` (committed when asked), or its refusal."""
        cycle = Cycle(request, self.state, now, self.rng)
        self.last_cycle = cycle
        out = self.handler.run(cycle, pool, explain)
        primary = out.results[out.primary]
        if not primary.endpoints:
            return Refusal(request.request_id, primary.code or NO_ENDPOINT, primary.refusal, out.results)
        prefill = out.results[out.prefill].endpoints[0] if out.prefill else None
        decision = Decision(request.request_id, primary.endpoints, out.primary, prefill, out.results)
        if self._shadows:
            self._run_shadows(cycle, pool, decision.endpoint)
        if commit:
            self.commit(cycle, decision)
        return decision

    def flush(self) -> None:
        """Apply queued assumed-state insertions (idempotent; ``route`` calls it first)."""
        pending, self._pending = self._pending, []
        for endpoint_id, cycle in pending:
            self.state.remember(endpoint_id, cycle.chain.all())

    def _run_shadows(self, cycle: Cycle, pool: list, acting: str) -> None:  # type: ignore[type-arg]
        for prof in self._shadows:
            res = prof.run(cycle, pool, explain=True)
            self.shadow_stats[prof.name].observe(acting, res.endpoints[0] if res.endpoints else None, res.all_scores)

    def commit(self, cycle: Cycle, decision: Decision) -> None:
        """Act on ``decision``: assumed prefix state, in-flight load, plugin learning."""
        st = self.state
        target = st.endpoints.get(decision.endpoint)
        if target is None:
            return
        if decision.prefill is not None:
            pf = st.endpoints[decision.prefill]
            uncached = cycle.uncached_tokens(pf, self.accounting_source)
            st.dispatched(decision.request_id + PREFILL_SUFFIX, pf.id, uncached, cycle.now)
            st.dispatched(decision.request_id, target.id, 0, cycle.now)
            self._pending.append((pf.id, cycle))
        else:
            st.dispatched(decision.request_id, target.id, cycle.uncached_tokens(target, self.accounting_source),
                          cycle.now)
        self._pending.append((target.id, cycle))
        for name, res in decision.results.items():
            if not res.endpoints:
                continue
            chosen = st.endpoints.get(res.endpoints[0])
            if chosen is None:
                continue
            for plugin in self.profiles[name].learners:
                plugin.picked(cycle, chosen)

