"""The command-ordering rules (scale and cordon): an older command redelivered after a newer
one must not win, whatever the stream's clock did between them and whatever the stored value's format. The real
reconciler (in process, not started: its command handler driven as its pull loop would) on the session's real NATS
and Redis, as ``test_scale_command_order``."""

from __future__ import annotations

import asyncio

import msgspec

from services.reconciler.service import Reconciler
from shared.bus import subjects
from shared.bus.messages import CordonEvent
from shared.core.placement.domain import GIB
from shared.state.store import Keys
from tests.unit.services.test_scale_command_order import SPEC, STORED_NS, cordon, delivered, rec

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


async def test_a_stale_cordon_tells_no_one(rec: Reconciler) -> None:
    # The snapshots follow CordonEvents, not Redis: a stale command must not announce the cordon it was refused.
    told: list[object] = []
    publish = rec.bus.publish

    async def keep(subject: str, msg: object, *args: object, **kwargs: object) -> None:
        if subject == subjects.EVENT_CORDON:
            told.append(msg)
        await publish(subject, msg, *args, **kwargs)  # type: ignore[arg-type]

    rec.bus.publish = keep  # type: ignore[method-assign]
    await rec.handle_commands([cordon(rec, seq=20, cordoned=False)])
    await rec.handle_commands([cordon(rec, seq=15, cordoned=True, deliveries=2)])
    assert told == [CordonEvent(worker="w0", cordoned=False)]


async def test_a_refused_redelivery_on_the_locked_path_leaves_the_spec_of_the_newer_command(rec: Reconciler) -> None:
    # As test_a_refused_redelivery_leaves_the_spec_of_the_newer_command, with the model's converge lock held by
    # another reconciler when the batch comes: the command goes the locked way (``converge``).
    await rec.handle_commands([delivered(rec, seq=12, replicas=3)])
    token = await rec.store.lock_model("m")
    assert token is not None

    async def release() -> None:
        await asyncio.sleep(0.3)
        await rec.store.unlock_model("m", token)

    releasing = asyncio.ensure_future(release())
    old = msgspec.structs.replace(SPEC, vram_claim=2 * GIB)
    await rec.handle_commands([delivered(rec, seq=7, replicas=5, deliveries=2, spec=old)])
    await releasing
    assert await rec.store.desired() == {"m": 3}
    now = await rec.spec_of("m")
    assert now is not None and now.vram_claim == GIB
