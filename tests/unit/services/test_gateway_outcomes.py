"""OutcomeShare: what a gateway replica tells its peers of its engines' failures and how it counts theirs."""

from __future__ import annotations

from services.gateway.outcomes import KNOWN_REPLICAS, OutcomeShare
from shared.bus.messages import EndpointOutcome, EndpointOutcomes
from shared.core.routing import Endpoint
from shared.core.routing.state import PoolState

NOW = 1_000.0


def _share(replica: str = "me-000001") -> OutcomeShare:
    state = PoolState()
    for e in ("e0", "e1"):
        state.upsert(Endpoint(e, "m"))
    return OutcomeShare(state, clock=lambda: NOW, replica=replica)


def _msg(replica: str, seq: int, endpoint: str = "e0", failed: bool = True) -> EndpointOutcomes:
    return EndpointOutcomes(replica=replica, seq=seq, outcomes=[EndpointOutcome(endpoint=endpoint, failed=failed)])


def test_nothing_seen_sends_nothing() -> None:
    assert _share().outgoing() is None


def test_each_message_is_numbered_after_the_last() -> None:
    s = _share()
    for seq in range(3):
        s.state.dispatched(f"r{seq}", "e0", 1, NOW)
        s.state.finished(f"r{seq}", ok=False, now=NOW)
        out = s.outgoing()
        assert out is not None and out.seq == seq and out.replica == s.replica
        assert [(o.endpoint, o.failed) for o in out.outcomes] == [("e0", True)]


def test_its_own_message_is_not_counted_again() -> None:
    s = _share()
    assert s.take(_msg(s.replica, 0)) == 0 and s.state.endpoints["e0"].failed_at is None


def test_a_peers_failure_is_dated_on_arrival() -> None:
    s = _share()
    assert s.take(_msg("peer-0001", 0)) == 1 and s.state.endpoints["e0"].failed_at == NOW


def test_a_message_numbered_at_or_below_the_last_taken_is_dropped() -> None:
    s = _share()
    s.take(_msg("peer-0001", 5))
    assert s.take(_msg("peer-0001", 5)) == 0 and s.take(_msg("peer-0001", 2)) == 0 and s.duplicates == 2
    assert s.state.endpoints["e0"].fail_streak == 1
    assert s.take(_msg("peer-0002", 0)) == 1  # another replica's numbering is its own


def test_the_replicas_remembered_are_bounded() -> None:
    s = _share()
    for i in range(KNOWN_REPLICAS + 10):
        s.take(_msg(f"peer-{i:06d}", 0, endpoint="nobody"))
    assert len(s._last) == KNOWN_REPLICAS
