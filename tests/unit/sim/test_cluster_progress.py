"""The cluster simulation reports its progress through a callback and does no I/O of its own."""

from __future__ import annotations

from ops.cli.simulate import build_cluster
from shared.core.sim import simulate
from shared.traces import load_trace


def test_progress_is_reported_in_order_up_to_every_request() -> None:
    trace = load_trace("mooncake", 1.0, 500)
    seen: list[tuple[int, int]] = []
    simulate(trace, build_cluster("llama-3.1-8b", "H100-SXM-80GB", 2), progress=lambda d, t: seen.append((d, t)))
    done = [d for d, _ in seen]
    assert done == sorted(done) and done[0] == 0 and done[-1] == 500
    assert {t for _, t in seen} == {500}
    assert 50 <= len(seen) <= 102  # about every 1 %, not every request
