"""A pulled batch of commands is not in stream order when it holds a redelivery: a command a reconciler took and
died on comes back after its ack wait, behind newer commands already delivered to its restarted successor. The
newest command of each model must still win, and a cordon command redelivered in a later batch than a newer one for
the same worker or GPU must not undo it. The real reconciler (in process, not started: its command handler
driven as its pull loop would) on the session's real NATS and Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.msg import Msg

from ops.servers import ServerProcess
from services.reconciler.service import Reconciler
from shared.bus import streams, subjects
from shared.bus.messages import CordonCommand, PlacementItem, ScaleCommand, WorkerRegisteredEvent, encode
from shared.bus.runtime import Bus
from shared.core.placement.domain import GIB, Gpu, ModelSpec, Worker
from shared.settings import Settings

W0 = Worker(name="w0", gpus=tuple(Gpu(index=i, vram_total=80 * GIB) for i in range(8)), ram_total=512 * GIB)
SPEC = ModelSpec(name="m", vram_claim=GIB, weight_bytes=GIB)


@pytest.fixture
async def rec(redis_server: ServerProcess, nats_server: ServerProcess) -> AsyncIterator[Reconciler]:
    r = Reconciler(Settings(nats_url=nats_server.url, redis_url=redis_server.url.rsplit("/", 1)[0] + "/12"))
    await r.store.r.flushdb()
    await r.store.register_workers([W0], seen_at=r.clock())
    r.feed.on_registered(WorkerRegisteredEvent(worker=W0, revision=1), r.clock())
    nc = await nats.connect(nats_server.url)
    r._bus = Bus(nc, r.name)
    asked: list[PlacementItem] = []

    async def placement_stream(out: Sequence[tuple[str, Any, str]]) -> None:  # what would go out on JetStream
        asked.extend(item for _, req, _ in out for item in req.items)

    r.bus.publish_js_many = placement_stream  # type: ignore[method-assign]
    created(r, STORED_NS / 1e9 - 3600)
    yield r
    await nc.close()
    await r.store.close()


STORED_NS = 1_700_000_000_000_000_000  # when the stream stored the command (nanoseconds)


def created(rec: Reconciler, at: float) -> None:
    """The command stream as created at ``at`` (unix s): what the reconciler reads of it (STREAM.INFO)."""

    async def stream_created() -> float:
        return at

    rec._command_stream_created = stream_created  # type: ignore[method-assign]


def command(rec: Reconciler, subject: str, data: bytes, seq: int, deliveries: int, stored_ns: int) -> Msg:
    """A command as the command consumer hands it over: its stream sequence, delivery count and stream time in the
    reply subject JetStream acks go to."""
    reply = f"$JS.ACK.{streams.STREAM_CMD}.{streams.CONSUMER_SCALE}.{deliveries}.{seq}.{seq}.{stored_ns}.0"
    return Msg(rec.bus.nc, subject=subject, data=data, reply=reply)


def delivered(rec: Reconciler, seq: int, replicas: int, deliveries: int = 1, stored_ns: int = STORED_NS,
              spec: ModelSpec = SPEC) -> Msg:
    """A scale command of model ``m`` as delivered (``command``)."""
    data = encode(ScaleCommand(model="m", replicas=replicas, spec=spec))
    return command(rec, subjects.SCALE, data, seq, deliveries, stored_ns)


@pytest.mark.parametrize("applied_before", [None, 8], ids=["first-batch", "after-an-applied-one"])
async def test_a_redelivered_scale_command_behind_a_newer_one_does_not_undo_it(
    rec: Reconciler, applied_before: int | None
) -> None:
    if applied_before is not None:  # the successor's first batch: commands sent while nothing consumed them
        await rec.handle_commands([delivered(rec, seq=10, replicas=applied_before)])
    # Its next batch: the newest command, then one its dead predecessor had taken (back after the ack wait).
    await rec.handle_commands([delivered(rec, seq=12, replicas=10), delivered(rec, seq=7, replicas=5, deliveries=2)])
    assert await rec.store.desired() == {"m": 10}
    assert len(await rec.store.instances("m")) == 10


def cordon(rec: Reconciler, seq: int, cordoned: bool, gpu: int | None = None, deliveries: int = 1,
           stored_ns: int = STORED_NS) -> Msg:
    """A cordon command of worker ``w0`` (or one of its GPUs) as delivered (``command``)."""
    data = encode(CordonCommand(worker="w0", cordoned=cordoned, gpu_index=gpu))
    return command(rec, subjects.CORDON, data, seq, deliveries, stored_ns)


@pytest.mark.parametrize("gpu", [None, 3], ids=["worker", "gpu"])
async def test_a_redelivered_cordon_in_a_later_batch_than_a_newer_uncordon_does_not_undo_it(
    rec: Reconciler, gpu: int | None
) -> None:
    await rec.handle_commands([cordon(rec, seq=20, cordoned=False, gpu=gpu)])
    await rec.handle_commands([cordon(rec, seq=15, cordoned=True, gpu=gpu, deliveries=2)])  # its ack wait ran out
    assert await rec.store.cordons() == set()


async def test_a_newer_cordon_and_a_redelivery_of_the_applied_one_still_apply(rec: Reconciler) -> None:
    await rec.handle_commands([cordon(rec, seq=20, cordoned=True)])
    await rec.handle_commands([cordon(rec, seq=20, cordoned=True, deliveries=2)])  # its ack was lost: same state
    assert await rec.store.cordons() == {"w0"}
    await rec.handle_commands([cordon(rec, seq=21, cordoned=False), cordon(rec, seq=22, cordoned=True, gpu=1)])
    assert await rec.store.cordons() == {"w0:1"}


async def test_a_scale_command_of_a_stream_created_again_is_applied_though_its_sequence_restarted(
    rec: Reconciler,
) -> None:
    # The command stream deleted and provisioned again (a new NATS volume, memory storage after a restart) while Redis
    # kept what it applied: the new commands' sequences start again at 1, but the stream stored them later.
    await rec.handle_commands([delivered(rec, seq=500, replicas=2)])
    created(rec, STORED_NS / 1e9 + 30)
    await rec.handle_commands([delivered(rec, seq=1, replicas=4, stored_ns=STORED_NS + 60 * 10**9)])
    assert await rec.store.desired() == {"m": 4}
    await rec.handle_commands([delivered(rec, seq=2, replicas=3, stored_ns=STORED_NS + 61 * 10**9)])
    assert await rec.store.desired() == {"m": 3}


async def test_a_cordon_command_of_a_stream_created_again_is_applied_though_its_sequence_restarted(
    rec: Reconciler,
) -> None:
    await rec.handle_commands([cordon(rec, seq=500, cordoned=True)])
    created(rec, STORED_NS / 1e9 + 30)
    await rec.handle_commands([cordon(rec, seq=1, cordoned=False, stored_ns=STORED_NS + 60 * 10**9)])
    assert await rec.store.cordons() == set()


async def test_a_refused_redelivery_leaves_the_spec_of_the_newer_command(rec: Reconciler) -> None:
    # The redelivered command carries the model's older spec: refused, it must not become the spec placed with.
    await rec.handle_commands([delivered(rec, seq=12, replicas=3)])
    old = msgspec.structs.replace(SPEC, vram_claim=2 * GIB)
    await rec.handle_commands([delivered(rec, seq=7, replicas=5, deliveries=2, spec=old)])
    assert await rec.store.desired() == {"m": 3}
    now = await rec.spec_of("m")
    assert now is not None and now.vram_claim == GIB
    assert rec.specs["m"].vram_claim == GIB  # cached again: later lookups need no read of Redis
