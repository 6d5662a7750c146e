"""kv-cache-utilization-scorer (GIE): ``1 − kv_usage`` (absolute, not min-max); no metrics scores 0."""

from __future__ import annotations

import numpy as np

from shared.core.routing.cycle import Cycle
from shared.core.routing.domain import EndpointState
from shared.core.routing.plugin import Scorer, Scores


class KvUtilizationScorer(Scorer):
    """More free KV cache, higher score."""

    type_name = "kv-cache-utilization-scorer"
    bounded = True  # clamped here

    def score(self, cycle: Cycle, cands: list[EndpointState]) -> Scores:
        """``1 − kv_usage`` clamped to [0, 1]."""
        model = cycle.request.model
        pool = cycle.state.pool(model)
        scores = cycle.state.memo(("kv-free", model), lambda: {st: free_kv(st) for st in pool})
        if cands is pool:  # nothing filtered: one array per metrics version
            return cycle.state.memo(("kv-free-array", model), lambda: _frozen(list(map(scores.__getitem__, pool))))
        return list(map(scores.__getitem__, cands))


def free_kv(st: EndpointState) -> float:
    """One endpoint's score (no metrics: 0)."""
    m = st.metrics
    if m is None:
        return 0.0
    u = m.kv_usage
    return 1.0 - u if 0.0 <= u <= 1.0 else (0.0 if u > 1.0 else 1.0)


def _frozen(scores: list[float]) -> Scores:
    out = np.array(scores, dtype=np.float64)
    out.flags.writeable = False  # memoised: shared by every decision until the next report
    return out
