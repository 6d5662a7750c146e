"""OutcomeShare: what a picker replica tells its peers of its engines' failures and how it counts theirs."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from shared.bus import subjects
from shared.bus.messages import EndpointOutcome, EndpointOutcomes
from shared.core.routing import Endpoint
from shared.core.routing.state import PoolState
from shared.host.outcomes import KNOWN_REPLICAS, MAX_LATE_S, OutcomeShare, PeerOutcomeMetrics

NOW = 1_000.0


def _share(replica: str = "me-000001") -> OutcomeShare:
    state = PoolState()
    for e in ("e0", "e1"):
        state.upsert(Endpoint(e, "m"))
    return OutcomeShare(state, subjects.GATEWAY_OUTCOMES, clock=lambda: NOW, replica=replica)


def _msg(replica: str, seq: int, endpoint: str = "e0", failed: bool = True, sent_at: float = NOW) -> EndpointOutcomes:
    return EndpointOutcomes(replica=replica, seq=seq, sent_at=sent_at,
                            outcomes=[EndpointOutcome(endpoint=endpoint, failed=failed)])


def _fail(s: OutcomeShare, tag: str, endpoint: str = "e0") -> None:
    s.state.dispatched(tag, endpoint, 1, NOW)
    s.state.finished(tag, ok=False, now=NOW)


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


@pytest.mark.parametrize("sent", [NOW - MAX_LATE_S - 0.5, NOW + MAX_LATE_S + 0.5])
def test_a_message_sent_too_long_ago_or_dated_ahead_is_dropped(sent: float) -> None:
    # NATS delivers what a disconnected replica published once it reconnects: those failures are old news
    s = _share()
    assert s.take(_msg("peer-0001", 0, sent_at=sent)) == 0 and s.late == 1
    assert s.state.endpoints["e0"].failed_at is None


def test_a_replica_started_after_an_engine_broke_leaves_it_out_from_a_peers_digest() -> None:
    a, c = _share("replica-a"), _share("replica-c")
    for k in range(3):
        _fail(a, f"f{k}")
    a.outgoing()  # its failures went out before c started
    assert a.outgoing() is None  # no news since: nothing to send
    digest = a.outgoing(digest=True)
    assert digest is not None and [(f.endpoint, f.streak) for f in digest.failing] == [("e0", 3)]
    assert c.take(digest) == 1 and c.state.endpoints["e0"].broken(NOW)


def test_a_digest_does_not_renew_the_hold() -> None:
    from shared.core.routing.domain import FAILED_HOLD_S

    a = _share("replica-a")
    for k in range(3):
        _fail(a, f"f{k}")
    a.outgoing()  # its failures went out long before c started
    later = NOW + FAILED_HOLD_S - 1
    a.clock = lambda: later
    digest = a.outgoing(digest=True)
    assert digest is not None and digest.failing[0].age_s == pytest.approx(FAILED_HOLD_S - 1)
    c = _share("replica-c")
    c.clock = lambda: later
    c.take(digest)
    st = c.state.endpoints["e0"]
    assert st.broken(later) and not st.broken(NOW + FAILED_HOLD_S + 0.01)  # out until a's hold ends, no longer


def test_a_digest_naming_a_failure_before_a_success_seen_here_is_ignored() -> None:
    a, b = _share("replica-a"), _share("replica-b")
    for k in range(3):
        _fail(a, f"f{k}")
    news = a.outgoing()
    assert news is not None and b.take(news) == 3 and b.state.endpoints["e0"].broken(NOW)
    b.state.dispatched("ok", "e0", 1, NOW + 0.5)  # b tries e0 again later and it answers
    b.state.finished("ok", ok=True, now=NOW + 0.5)
    digest = a.outgoing(digest=True)  # a has not heard of that success yet
    assert digest is not None and not digest.outcomes and b.take(digest) == 0
    assert not b.state.endpoints["e0"].failing(NOW + 0.6)


def test_failures_a_peer_sent_before_a_success_seen_here_do_not_bring_the_engine_back() -> None:
    a, b = _share("replica-a"), _share("replica-b")
    _fail(a, "f0")
    news = a.outgoing()  # sent at NOW, delayed on the way
    _fail(b, "g0")
    b.state.dispatched("ok", "e0", 1, NOW + 0.5)
    b.state.finished("ok", ok=True, now=NOW + 0.5)
    b.clock = lambda: NOW + 0.6
    assert news is not None and b.take(news) == 0 and not b.state.endpoints["e0"].failing(NOW + 0.6)


class _Bus:
    """Stands in for the bus: connected, recording what is published."""

    def __init__(self) -> None:
        self.sent: list[EndpointOutcomes] = []
        self.nc = self
        self.is_connected = True

    async def publish(self, subject: str, msg: EndpointOutcomes) -> None:
        self.sent.append(msg)


def test_the_sender_sleeps_until_there_is_news_then_sends_it_and_digests_while_an_engine_fails() -> None:
    import asyncio

    async def scenario() -> None:
        import time

        s = _share()
        s.clock = time.time
        looked = 0
        take = s.outgoing

        def counted(digest: bool = False) -> EndpointOutcomes | None:
            nonlocal looked
            looked += 1
            return take(digest)

        s.outgoing = counted  # type: ignore[method-assign]
        bus = _Bus()
        task = asyncio.create_task(s.send_forever(bus))  # type: ignore[arg-type]
        await asyncio.sleep(0.4)
        assert looked == 0 and not bus.sent  # idle: no polling
        s.state.dispatched("r", "e0", 1, time.time())
        s.state.finished("r", ok=False, now=time.time())
        await asyncio.sleep(1.5)
        task.cancel()
        assert [(o.endpoint, o.failed) for o in bus.sent[0].outcomes] == [("e0", True)]
        assert any(m.failing and m.failing[0].endpoint == "e0" for m in bus.sent[1:])  # then its digest

    asyncio.run(scenario())


def test_the_counts_are_exposed_per_result_when_scraped() -> None:
    share = _share()
    share.take(_msg("peer-1", 1))
    share.take(_msg("peer-1", 1))  # a duplicate
    share.take(_msg("peer-1", 2, sent_at=NOW - MAX_LATE_S - 1))  # late
    registry = CollectorRegistry()
    registry.register(PeerOutcomeMetrics("picker", share))
    text = generate_latest(registry).decode()
    for result, count in (("applied", 1), ("duplicate", 1), ("late", 1), ("unsent", 0)):
        assert f'gantry_peer_outcomes_total{{result="{result}",service="picker"}} {count}.0' in text, text
