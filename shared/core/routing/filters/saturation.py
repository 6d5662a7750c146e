"""saturation-filter: sheddable traffic (priority < 0) only goes to endpoints with headroom.

Uses the utilization detector (queue > 5 or KV > 0.8, stale = saturated). When every endpoint is
saturated a sheddable request is refused with 429 (GIE ``LegacyAdmissionController``); requests with
priority >= 0 pass untouched (they wait in flow control instead of being dropped).
"""

from __future__ import annotations

import msgspec

from shared.core.routing.cycle import Cycle
from shared.core.routing.domain import SHED, EndpointState
from shared.core.routing.plugin import Filter
from shared.core.routing.saturation import DetectorConfig, UtilizationDetector


class SaturationFilter(Filter):
    """Drops saturated endpoints for sheddable requests."""

    type_name = "saturation-filter"
    Params = DetectorConfig
    refusal_code = SHED

    def __init__(self, name: str, params: msgspec.Struct) -> None:
        super().__init__(name, params)
        assert isinstance(params, DetectorConfig)
        self.detector = UtilizationDetector(params)

    @classmethod
    def check(cls, params: msgspec.Struct) -> list[str]:
        """The detector's own checks."""
        assert isinstance(params, DetectorConfig)
        return params.problems()

    def filter(self, cycle: Cycle, cands: list[EndpointState]) -> list[EndpointState]:
        """All endpoints for priority >= 0; endpoints with headroom for sheddable requests."""
        if not cycle.request.sheddable:
            return cands
        now, sat = cycle.now, self.detector.saturated
        ts, waiting, kv = cycle.column(cands, "ts"), cycle.column(cands, "waiting"), cycle.column(cands, "kv_usage")
        if ts is not None and waiting is not None and kv is not None:
            return cycle.keep(cands, ~self.detector.saturated_columns(ts, waiting, kv, now))
        return [st for st in cands if not sat(st, now)]

    def why(self, cycle: Cycle) -> str:
        """The thresholds."""
        c = self.detector.config
        return f"saturated (queue > {c.queue_threshold:g}, KV > {c.kv_threshold:g} or stale) for sheddable traffic"
