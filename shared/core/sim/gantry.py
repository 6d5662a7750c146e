"""The routing core as a simulator router: the same ``Router`` a picker service runs, fed in virtual time.

At each arrival the adapter brings the router's view up to ``now`` the way the model-server protocol
would: the engines' KV events (batches stamped at or before ``now``; a batch whose last step ends later
waits), state reports (waiting, running, KV usage) sampled every ``metrics_interval_s`` (50 ms, the GIE
scrape interval, so metrics are realistically stale between samples), and first tokens / finishes of
the requests it routed (the gateway's in-flight accounting). Then it routes the request on its block
hashes: the engine's own chained hashes of the trace's prefix blocks, so the precise index and the
engines agree exactly. A refusal (e.g. 429 for shed traffic) is returned as the reason, and the
simulator counts it.

``replicas > 1`` runs several independent routers (gateway replicas behind a round-robin load balancer,
as an HA deployment does): each sees every engine's state reports and KV events, but only its own
decisions and in-flight requests, which is what separates the approximate index (per replica) from the
precise one (shared through the engines' events; llm-d: "Active-Active mode should be avoided when using
approximate prefix routing").
"""

from __future__ import annotations

from collections.abc import Sequence

from shared.core.engine import Engine, KVCache, Request
from shared.core.kv_events import KVEventBatch
from shared.core.routing import Decision, Endpoint, EndpointMetrics, Router, RouterConfig, RouteRequest, builtin_config

MODEL = "model"


class GantryRouter:
    """Routes with a routing-core profile (a built-in name or a config)."""

    needs_state = True

    def __init__(self, profile: str | RouterConfig = "default", *, metrics_interval_s: float = 0.05, seed: int = 0,
                 kv_events: bool = True, replicas: int = 1) -> None:
        if replicas < 1:
            raise ValueError(f"router replicas must be >= 1 (got {replicas})")
        config = builtin_config(profile) if isinstance(profile, str) else profile
        self.routers = [Router(config, seed=seed + i) for i in range(replicas)]
        self.router = self.routers[0]
        self._owner: dict[str, Router] = {}
        self._turn = 0
        self.metrics_interval_s = metrics_interval_s
        self.kv_events = kv_events
        self._ids: list[str] = []
        self._index: dict[str, int] = {}
        self._live: dict[str, Request] = {}
        self._prefilled: set[str] = set()
        self._pending: list[list[KVEventBatch]] = []
        self._last_sample = float("-inf")
        self._scratch: KVCache | None = None
        self.decisions = 0
        self.refusals = 0

    def _setup(self, engines: Sequence[Engine]) -> None:
        for k, e in enumerate(engines):
            cfg = e.scheduler.config
            ep = Endpoint(id=f"replica-{k}", model=MODEL, block_size=cfg.block_size,
                          num_gpu_blocks=cfg.num_gpu_blocks - 1, max_num_batched_tokens=cfg.max_num_batched_tokens,
                          role=cfg.role, max_loras=cfg.max_loras)
            for router in self.routers:
                router.state.upsert(ep, e.step_model)
            self._ids.append(ep.id)
            self._index[ep.id] = k
        self._pending = [[] for _ in engines]
        self._scratch = KVCache(2, engines[0].scheduler.config.block_size)

    def _observe(self, engines: Sequence[Engine], now: float) -> None:
        done = []
        for rid, req in self._live.items():
            if rid not in self._prefilled and 0 <= req.first_token_time <= now:
                self._prefilled.add(rid)
                self._owner[rid].first_token(rid)
            if 0 <= req.finish_time <= now:
                done.append(rid)
        for rid in done:
            del self._live[rid]
            self._prefilled.discard(rid)
            self._owner.pop(rid).finished(rid)
        if self.kv_events:
            for k, e in enumerate(engines):
                batch = e.take_kv_events()
                pending = self._pending[k]
                if batch is not None:
                    pending.append(batch)
                while pending and pending[0].ts <= now:
                    b = pending.pop(0)
                    for r in self.routers:
                        r.apply_kv_events(self._ids[k], b)
        if now - self._last_sample >= self.metrics_interval_s:
            self._last_sample = now
            for k, e in enumerate(engines):
                s = e.scheduler
                m = EndpointMetrics(ts=now, waiting=len(s.waiting), running=len(s.running), kv_usage=s.kv.usage)
                for r in self.routers:
                    r.update_metrics(self._ids[k], m)

    def _hashes(self, req: Request) -> list[int]:
        scratch = self._scratch
        assert scratch is not None
        n = min(req.prompt_len // scratch.block_size, self.router.state.config.max_prefix_blocks)
        for b in range(n):
            scratch.hash_at(req, b)  # the engine's own hash, kept on the request (the engine reuses it)
        return req.block_hashes[:n]

    def pick(self, engines: Sequence[Engine], now: float, request: Request) -> int | str:
        """Route ``request`` with the core; a refusal comes back as its reason."""
        if not self._ids:
            self._setup(engines)
        self._observe(engines, now)
        rr = RouteRequest(request.req_id, MODEL, block_hashes=self._hashes(request), prompt_tokens=request.prompt_len,
                          priority=request.priority)
        router = self.routers[self._turn % len(self.routers)]
        self._turn += 1
        out = router.route(rr, now)
        if not isinstance(out, Decision):
            self.refusals += 1
            return f"{out.code} {out.reason}"
        self.decisions += 1
        self._live[request.req_id] = request
        self._owner[request.req_id] = router
        return self._index[out.endpoint]

    def failed(self, request: Request) -> None:
        """The engine refused the request: release its accounting."""
        self._live.pop(request.req_id, None)
        owner = self._owner.pop(request.req_id, None)
        if owner is not None:
            owner.finished(request.req_id, ok=True)  # it answered, with a refusal of the request (a 400)


def make_gantry(spec: str, replicas: int = 1) -> GantryRouter:
    """``gantry`` (default profile) or ``gantry:PROFILE``; raises ValueError for an unknown profile."""
    _, _, profile = spec.partition(":")
    return GantryRouter(profile or "default", replicas=replicas)
