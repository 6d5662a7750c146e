"""Utilization saturation detector (GIE/llm-d ``utilization-detector``, 2026 default).

Per endpoint ``s_e = max(waiting / queue_threshold, kv_usage / kv_threshold)``; stale or missing metrics
count as ``s_e = 1`` (fail closed); the pool's saturation is the mean of ``s_e`` (no endpoints: 1).
An endpoint is saturated, as in the reference, per
signal: ``waiting > queue_threshold·(1+headroom)`` or ``kv > min(1, kv_threshold·(1+headroom))``.
Defaults: queue 5, KV 0.8, staleness 200 ms, headroom 0 (``../shared/research/routing.md`` §1.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import numpy as np
import numpy.typing as npt

from shared.core.routing.domain import EndpointState


class DetectorConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Thresholds of the utilization detector."""

    queue_threshold: float = 5.0
    kv_threshold: float = 0.8
    headroom: float = 0.0
    staleness_s: float = 0.2

    def problems(self) -> list[str]:
        """Invalid settings as sentences."""
        out = []
        if not self.queue_threshold > 0:
            out.append(f"queue_threshold must be > 0 (got {self.queue_threshold})")
        if not 0 < self.kv_threshold <= 1:
            out.append(f"kv_threshold must be in (0, 1] (got {self.kv_threshold})")
        if not self.headroom >= 0:
            out.append(f"headroom must be >= 0 (got {self.headroom})")
        if not self.staleness_s > 0:
            out.append(f"staleness_s must be > 0 (got {self.staleness_s})")
        return out


BELOW_FULL = 1.0 - 1e-9  # an endpoint with room counts at most this: a mean over any pool stays under 1


class UtilizationDetector:
    """Saturation per endpoint and for a pool, from the endpoints' state reports."""

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()
        problems = self.config.problems()
        if problems:
            raise ValueError("saturation detector: " + "; ".join(problems))
        c = self.config
        self._q_limit = c.queue_threshold * (1 + c.headroom)
        self._kv_limit = min(1.0, c.kv_threshold * (1 + c.headroom))

    def endpoint(self, st: EndpointState, now: float) -> float:
        """``s_e`` (1.0 when metrics are stale or missing)."""
        m = st.metrics
        if m is None or now - m.ts > self.config.staleness_s:
            return 1.0
        return max(m.waiting / self.config.queue_threshold, m.kv_usage / self.config.kv_threshold)

    def saturated(self, st: EndpointState, now: float) -> bool:
        """True when the endpoint has no headroom left (stale counts as saturated)."""
        m = st.metrics
        if m is None or now - m.ts > self.config.staleness_s:
            return True
        return m.waiting > self._q_limit or m.kv_usage > self._kv_limit

    def saturated_columns(self, ts: npt.NDArray[np.float64], waiting: npt.NDArray[np.float64],
                          kv_usage: npt.NDArray[np.float64], now: float) -> npt.NDArray[np.bool_]:
        """``saturated`` of each endpoint from its report's columns (``ts`` -inf: no report, which counts as
        saturated as a stale one does)."""
        out: npt.NDArray[np.bool_] = (now - ts > self.config.staleness_s) | (waiting > self._q_limit) | (
            kv_usage > self._kv_limit)
        return out

    def pool(self, endpoints: Sequence[EndpointState], now: float) -> float:
        """Mean ``s_e`` over the pool, each at most 1; 1.0 for an empty pool.

        GIE's mean takes ``s_e`` as it is; here an endpoint past its thresholds counts as full, as a stale one
        does: the pool reaches 1 only when no endpoint has room, and one endpoint's long queue (or one report's
        absurd one) cannot shed sheddable traffic the others have room for."""
        if not endpoints:
            return 1.0
        # an endpoint counts 1 only when ``saturated`` says so (strictly past its limits): at exactly queue 5 or KV 0.8
        # it still has room, and a pool of such endpoints must not shed what each of them would admit
        return sum(1.0 if self.saturated(st, now) else min(BELOW_FULL, self.endpoint(st, now))
                   for st in endpoints) / len(endpoints)

    def has_headroom(self, endpoints: Sequence[EndpointState], now: float) -> bool:
        """True when at least one endpoint is not saturated (flow control may dispatch)."""
        return any(not self.saturated(st, now) for st in endpoints)
