"""Review reproducers for the command-ordering rules (scale and cordon): an older command redelivered after a newer
one must not win, whatever the stream's clock did between them and whatever the stored value's format. The real
reconciler (in process, not started: its command handler driven as its pull loop would) on the session's real NATS
and Redis, as ``test_scale_command_order``."""

from __future__ import annotations

from services.reconciler.service import Reconciler
from shared.state.store import Keys
from tests.unit.services.test_scale_command_order import STORED_NS, cordon, delivered, rec

__all__ = ["rec"]  # the fixture, used by name

S = 10**9  # one second in nanoseconds


async def test_an_older_redelivered_scale_command_does_not_win_after_the_stream_clock_stepped_back(
    rec: Reconciler,
) -> None:
    # The stream stores seq 10 at T, then its clock steps back 5 s (NTP step, VM resume, or a JetStream leader change
    # to a node whose clock lags) and it stores seq 11 at T - 5 s. Seq 10 was taken by a reconciler that died: it
    # comes back after its ack wait, behind seq 11, which was applied.
    await rec.handle_commands([delivered(rec, seq=10, replicas=2, stored_ns=STORED_NS)])
    await rec.handle_commands([delivered(rec, seq=11, replicas=6, stored_ns=STORED_NS - 5 * S)])
    assert await rec.store.desired() == {"m": 6}
    await rec.handle_commands([delivered(rec, seq=10, replicas=2, deliveries=2, stored_ns=STORED_NS)])
    assert await rec.store.desired() == {"m": 6}, "the older command (seq 10) undid the newer one (seq 11)"


async def test_an_older_redelivered_cordon_does_not_win_after_the_stream_clock_stepped_back(rec: Reconciler) -> None:
    await rec.handle_commands([cordon(rec, seq=20, cordoned=True, stored_ns=STORED_NS)])
    await rec.handle_commands([cordon(rec, seq=21, cordoned=False, stored_ns=STORED_NS - 5 * S)])
    assert await rec.store.cordons() == set()
    await rec.handle_commands([cordon(rec, seq=20, cordoned=True, deliveries=2, stored_ns=STORED_NS)])
    assert await rec.store.cordons() == set(), "the older cordon (seq 20) undid the newer uncordon (seq 21)"


async def test_an_older_redelivered_scale_command_does_not_win_over_a_value_stored_before_the_upgrade(
    rec: Reconciler,
) -> None:
    # A reconciler of the previous release applied seq 500 and stored the sequence alone ("500"), as it did then.
    await rec.handle_commands([delivered(rec, seq=500, replicas=8, stored_ns=STORED_NS)])
    await rec.store.r.hset(Keys.desired_seq, "m", "500")  # the previous release's format
    assert await rec.store.desired() == {"m": 8}
    # After the upgrade, seq 400 (taken by the old reconciler as it was stopped, never acked) is redelivered: it is
    # older in sequence and in time than what was applied.
    await rec.handle_commands([delivered(rec, seq=400, replicas=1, deliveries=2, stored_ns=STORED_NS - 60 * S)])
    assert await rec.store.desired() == {"m": 8}, "a redelivery older than the stored (old format) command won"
