"""kv-cache-utilization-scorer (GIE): ``1 − kv_usage`` (absolute, not min-max); no metrics scores 0."""

from __future__ import annotations

from shared.core.routing.cycle import Cycle
from shared.core.routing.domain import EndpointState, kv_free
from shared.core.routing.plugin import Scorer, Scores


class KvUtilizationScorer(Scorer):
    """More free KV cache, higher score."""

    type_name = "kv-cache-utilization-scorer"
    bounded = True  # clamped here

    def score(self, cycle: Cycle, cands: list[EndpointState]) -> Scores:
        """``1 − kv_usage`` clamped to [0, 1]."""
        col = cycle.column(cands, "kv_free")  # kept by the reports
        return col if col is not None else [kv_free(st.metrics) for st in cands]


def free_kv(st: EndpointState) -> float:
    """One endpoint's score (no metrics: 0)."""
    return kv_free(st.metrics)
