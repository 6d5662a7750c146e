"""What the routing core decides about: a request, the endpoints of its pool and their latest state, and
the answer (a decision with an ordered fallback list, or a refusal with a reason and an HTTP-like code).

Codes follow the GIE endpoint-picker protocol (``../shared/research/routing.md`` §1.1): 503 when no
endpoint can serve, 429 when a sheddable request is dropped under saturation, 504 when a request waited
in flow control past its TTL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from shared.core.roles import NodeRole

NO_ENDPOINT = 503
SHED = 429
EXPIRED = 504
QUEUE_FULL = 429


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """One request to place on an endpoint.

    Prompt content comes as ``token_ids`` (hashed with the engines' chained block hash), as precomputed
    ``block_hashes`` (engine-consistent keys, e.g. from a gateway that already hashed, or a trace replay)
    with ``prompt_tokens``, or as ``prompt`` text (hashed in character blocks for the approximate index
    only). ``priority < 0`` marks sheddable traffic (GIE v1.0 ``InferenceObjective``).
    """

    request_id: str
    model: str
    token_ids: tuple[int, ...] | list[int] | None = None
    prompt: str | None = None
    block_hashes: tuple[int, ...] | list[int] | None = None
    prompt_tokens: int | None = None
    priority: int = 0
    tenant: str = ""
    session: str | None = None
    lora: str | None = None
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    cache_salt: int = 0
    expected_output_tokens: int | None = None
    # the endpoint ids the request may go to (GIE's subset hint from the proxy); None: any of its model's pool
    subset: frozenset[str] | None = None

    @property
    def sheddable(self) -> bool:
        """True for priority < 0 (may be refused with 429 when the pool is saturated)."""
        return self.priority < 0

    @property
    def num_prompt_tokens(self) -> int:
        """Prompt length in tokens: given, counted, or estimated from text (about 4 characters a token)."""
        if self.prompt_tokens is not None:
            return self.prompt_tokens
        if self.token_ids is not None:
            return len(self.token_ids)
        if self.prompt is not None:
            return max(1, len(self.prompt) // 4)
        return 0


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A routable model server, as placement knows it: where, what, on which GPU, which role."""

    id: str
    model: str
    address: str = ""
    role: NodeRole = NodeRole.MIXED
    gpu: str = ""
    tp: int = 1
    block_size: int = 16
    num_gpu_blocks: int = 0
    max_loras: int = 0
    adapters: frozenset[str] = frozenset()  # LoRA adapters this server can load
    max_num_batched_tokens: int = 8192


@dataclass(frozen=True, slots=True)
class EndpointMetrics:
    """The engine's own state report (model-server protocol; vLLM metric names in brackets)."""

    ts: float  # when the engine sampled it (seconds, the router's clock domain)
    waiting: int = 0  # num_requests_waiting
    running: int = 0  # num_requests_running
    kv_usage: float = 0.0  # kv_cache_usage_perc, 0..1
    active_loras: tuple[str, ...] = ()  # lora_requests_info running_lora_adapters
    waiting_loras: tuple[str, ...] = ()  # lora_requests_info waiting_lora_adapters
    draining: bool = False


class PoolColumns:
    """A pool's load and report figures as arrays aligned with its endpoint list (``PoolState.columns``).

    The scorers and filters read whole columns with a few numpy operations instead of walking the endpoint
    objects in Python; ``EndpointState`` writes through to its column, so the two never differ. The report
    columns are written by each report in O(1): a decision right after one costs what any other does (before,
    every report dropped per-pool values rebuilt by the next decision, ~4 ms at 10,000 endpoints).
    """

    __slots__ = ("busy", "draining", "failed_at", "kv_free", "kv_usage", "members", "position", "prefill", "rate",
                 "requests", "table", "tokens", "ts", "waiting")

    def __init__(self, members: list[EndpointState]) -> None:
        n = len(members)
        self.members = members  # the pool list itself: a candidate list that *is* it reads these columns
        self.tokens: npt.NDArray[np.float64] = np.fromiter((st.inflight_tokens for st in members), np.float64, n)
        self.rate: npt.NDArray[np.float64] = np.fromiter((st.effective_rate for st in members), np.float64, n)
        self.prefill: npt.NDArray[np.float64] = np.fromiter((st.prefill_rate for st in members), np.float64, n)
        self.requests: npt.NDArray[np.float64] = np.fromiter((st.inflight_requests for st in members), np.float64, n)
        # when a request last failed there, NaN when none did or one succeeded since (``EndpointState.failing``)
        self.failed_at: npt.NDArray[np.float64] = np.fromiter(
            (math.nan if (f := st.failed_at) is None else f for st in members), np.float64, n)
        self.busy: npt.NDArray[np.float64] = np.empty(n)  # the report's running + waiting; 0: no report
        self.waiting: npt.NDArray[np.float64] = np.empty(n)  # the report's queue; -1: no report
        self.kv_free: npt.NDArray[np.float64] = np.empty(n)  # ``kv_free`` of the report
        self.kv_usage: npt.NDArray[np.float64] = np.empty(n)  # the report's own figure; 0: no report
        self.ts: npt.NDArray[np.float64] = np.empty(n)  # when the report was sampled; -inf: no report
        self.draining: npt.NDArray[np.bool_] = np.empty(n, dtype=np.bool_)
        self.position = {st.slot: i for i, st in enumerate(members)}  # index slot → position in the pool
        self.table = position_table(self.position)
        for i, st in enumerate(members):
            self.report(i, st.metrics)
            st.attach(self, i)

    def positions(self, cands: list[EndpointState]) -> npt.NDArray[np.intp] | None:
        """Each of ``cands``' position in these columns (a sub-list of the pool reads them gathered); None when one
        of them is not a member."""
        table = self.table
        slots = np.fromiter((st.slot for st in cands), np.intp, len(cands))
        if len(slots) and (slots.min() < 0 or slots.max() >= len(table)):
            return None
        pos = table[slots]
        if len(pos) and pos.min() < 0:
            return None
        return pos

    def report(self, pos: int, m: EndpointMetrics | None) -> None:
        """The endpoint at ``pos`` reported ``m`` (None: it has not reported)."""
        if m is None:
            self.waiting[pos], self.ts[pos], self.draining[pos], self.busy[pos] = -1.0, -math.inf, False, 0.0
            self.kv_usage[pos] = 0.0
        else:
            self.waiting[pos], self.ts[pos], self.draining[pos] = m.waiting, m.ts, m.draining
            self.busy[pos], self.kv_usage[pos] = m.running + m.waiting, m.kv_usage
        self.kv_free[pos] = kv_free(m)


def kv_free(m: EndpointMetrics | None) -> float:
    """``1 − kv_usage`` of a report, clamped to [0, 1] (no report: 0)."""
    if m is None:
        return 0.0
    u = m.kv_usage
    return 1.0 - u if 0.0 <= u <= 1.0 else (0.0 if u > 1.0 else 1.0)


def position_table(position: dict[int, int]) -> npt.NDArray[np.intp]:
    """``position`` (slot → index) as an array indexed by slot, -1 where a slot is not there."""
    table = np.full(max(position, default=-1) + 1, -1, dtype=np.intp)
    table[list(position)] = list(position.values())
    return table


FAILED_HOLD_S = 10.0
"""How long a failure keeps an endpoint from counting as idle (each failure renews it): an engine failing every
request it gets keeps failing within it, and a healthy one that failed once (a restart, a reset connection) is not
kept from cold prompts for good; the core hears of a success only on a request it placed there."""
BROKEN_STREAK = 3
"""Failures in a row (each within the hold of the one before) after which an endpoint is broken: left out of the
pool the router decides over, so warm requests stop following their prefix onto it, until the hold lapses (a new
streak then starts) or a request succeeds there. At most half a pool is left out (``PoolState.working``)."""


class EndpointState:
    """An endpoint with its latest metrics and the router's own in-flight accounting."""

    __slots__ = ("_cols", "_failed_at", "_peak", "_pos", "_rate", "_requests", "_tokens", "endpoint", "fail_streak",
                 "id", "metrics", "slot")

    def __init__(self, endpoint: Endpoint, slot: int) -> None:
        self.endpoint = endpoint
        self.id = endpoint.id
        self.slot = slot  # bit position in the prefix indexes
        self.metrics: EndpointMetrics | None = None
        self._cols: PoolColumns | None = None
        self._pos = 0
        self._requests = 0
        self._failed_at: float | None = None
        self.fail_streak = 0  # failures in a row since the last success
        self._tokens = 0  # uncached prompt tokens sent and not yet prefilled (first token unseen)
        self._peak = 0.0
        self._rate = 0.0  # prefill tokens/s left beside the running decodes (refreshed with metrics)

    def report(self, metrics: EndpointMetrics) -> None:
        """Take the engine's state report (written through to the pool's columns)."""
        self.metrics = metrics
        if self._cols is not None:
            self._cols.report(self._pos, metrics)

    def failing(self, now: float) -> bool:
        """A request failed here less than ``FAILED_HOLD_S`` from ``now`` and none succeeded since (a failure dated
        past ``now``, the clock having stepped back, counts only within the hold, never for the step's length)."""
        return self.failed_at is not None and abs(now - self.failed_at) < FAILED_HOLD_S

    def broken(self, now: float) -> bool:
        """Failing, and ``BROKEN_STREAK`` requests here failed in a row, each within the hold of the one before."""
        return self.fail_streak >= BROKEN_STREAK and self.failing(now)

    def failed(self, when: float) -> None:
        """A request of this router failed here at ``when``. A streak counts only failures within the hold of each
        other: an engine that failed three times an hour apart is not broken."""
        self.fail_streak = self.fail_streak + 1 if self.failing(when) else 1
        self.failed_at = when

    def served(self) -> None:
        """A request of this router was answered here: no longer failing."""
        self.failed_at = None
        self.fail_streak = 0

    def attach(self, cols: PoolColumns | None, pos: int = 0) -> None:
        """Mirror this endpoint's load into ``cols`` at ``pos`` from now on (None: detach)."""
        self._cols = cols
        self._pos = pos

    @property
    def inflight_requests(self) -> int:
        """Requests sent here by this router and not yet seen finishing."""
        return self._requests

    @inflight_requests.setter
    def inflight_requests(self, value: int) -> None:
        self._requests = value
        if self._cols is not None:
            self._cols.requests[self._pos] = value

    @property
    def failed_at(self) -> float | None:
        """When a request of this router last failed here (an error answer, or the proxy moved it away), unless one
        succeeded since: an endpoint that fails fast looks idle, and must not be taken for it (``failing``)."""
        return self._failed_at

    @failed_at.setter
    def failed_at(self, value: float | None) -> None:
        self._failed_at = value
        if self._cols is not None:
            self._cols.failed_at[self._pos] = math.nan if value is None else value

    @property
    def inflight_tokens(self) -> int:
        """Uncached prompt tokens sent by this router and not yet prefilled (first token unseen)."""
        return self._tokens

    @inflight_tokens.setter
    def inflight_tokens(self, value: int) -> None:
        self._tokens = value
        if self._cols is not None:
            self._cols.tokens[self._pos] = value

    @property
    def prefill_rate(self) -> float:
        """Peak prefill tokens/s (set by the pool state from the GPU's step-time model)."""
        return self._peak

    @prefill_rate.setter
    def prefill_rate(self, value: float) -> None:
        self._peak = value
        if self._cols is not None:
            self._cols.prefill[self._pos] = value

    @property
    def effective_rate(self) -> float:
        """Prefill tokens/s left beside the running decodes (refreshed with each state report)."""
        return self._rate

    @effective_rate.setter
    def effective_rate(self, value: float) -> None:
        self._rate = value
        if self._cols is not None:
            self._cols.rate[self._pos] = value

    def __repr__(self) -> str:
        return f"EndpointState({self.id!r}, inflight={self.inflight_requests}/{self.inflight_tokens})"


@dataclass(frozen=True, slots=True)
class FilterReport:
    """What one filter dropped in one profile run, and why."""

    filter: str
    dropped: tuple[str, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class ProfileResult:
    """One profile's answer: endpoints in preference order (empty when refused), and its reasons."""

    profile: str
    endpoints: tuple[str, ...]
    scores: tuple[float, ...] = ()
    reports: tuple[FilterReport, ...] = ()
    refusal: str = ""
    code: int = 0
    all_scores: dict[str, float] = field(default_factory=dict)  # every candidate's total (explain mode)


@dataclass(frozen=True, slots=True)
class Decision:
    """Where to send the request: ``endpoints[0]`` first, the rest as ordered fallbacks.

    ``prefill`` is the prefill endpoint when the request is disaggregated (P/D), else None.
    """

    request_id: str
    endpoints: tuple[str, ...]
    profile: str
    prefill: str | None = None
    results: dict[str, ProfileResult] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        """The chosen endpoint."""
        return self.endpoints[0]


@dataclass(frozen=True, slots=True)
class Refusal:
    """No endpoint for this request: a code (503 / 429 / 504) and a one-line reason."""

    request_id: str
    code: int
    reason: str
    results: dict[str, ProfileResult] = field(default_factory=dict)


Outcome = Decision | Refusal
