"""The pull loop under a linger: lone messages go straight through, partial batches gather more."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import nats
import nats.errors
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig

from ops.servers import ServerProcess, start_nats
from shared.bus.pull import PULL_EXPIRES_S, PullConsumer, in_stream_order, pull_loop
from shared.host.tasks import cancel_until_done

LINGER = 1.0  # a lone message must go through in half of it: long enough for a loaded host


async def test_a_lone_message_is_not_held_back_but_a_partial_batch_lingers(nats_server: ServerProcess) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(name="LINGER", subjects=["linger.>"])
    await js.add_consumer("LINGER", ConsumerConfig(durable_name="c", ack_wait=30))
    handled: list[tuple[float, int]] = []

    async def handler(msgs: list[Msg]) -> None:
        handled.append((time.monotonic(), len(msgs)))
        await asyncio.gather(*(m.ack() for m in msgs))

    async def wait_for(n: int) -> None:
        while len(handled) < n:
            await asyncio.sleep(0.005)

    await js.publish("linger.a", b"1")
    await js.publish("linger.a", b"2")  # both waiting before the first fetch: a batch of two
    loop = asyncio.ensure_future(pull_loop(nc, "LINGER", "c", "linger.>", 16, handler, linger=LINGER))
    try:
        await wait_for(1)
        assert handled[0][1] == 2
        sent = time.monotonic()
        await js.publish("linger.a", b"3")  # after a partial batch: gathered for the linger first
        await wait_for(2)
        assert handled[1][0] - sent >= LINGER * 0.8

        sent = time.monotonic()
        await js.publish("linger.a", b"4")  # after a lone message: no wait
        await wait_for(3)
        assert handled[2][0] - sent < LINGER / 2
    finally:
        await cancel_until_done([loop])
        await nc.close()


async def test_a_steady_stream_of_lone_messages_is_gathered_once_per_linger(nats_server: ServerProcess) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(name="STEADY", subjects=["steady.>"])
    await js.add_consumer("STEADY", ConsumerConfig(durable_name="c", ack_wait=30))
    linger, gap, count = 0.3, 0.05, 12
    handled: list[int] = []

    async def handler(msgs: list[Msg]) -> None:
        handled.append(len(msgs))
        await asyncio.gather(*(m.ack() for m in msgs))

    loop = asyncio.ensure_future(pull_loop(nc, "STEADY", "c", "steady.>", 16, handler, linger=linger))
    try:
        began = time.monotonic()
        for k in range(count):  # one at a time, each handled long before the next arrives
            await js.publish("steady.a", str(k).encode())
            await asyncio.sleep(gap)
        span = time.monotonic() - began  # 0.6 s, more on a loaded host (each publish waits for its ack)
        await wait_until(lambda: sum(handled) == count, 15)
        # two lone ones open the stream, then one batch per linger period of the messages' span at most
        assert len(handled) <= 2 + int(span / linger) + 1
        assert max(handled) > 1
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await nc.close()


async def test_the_loop_asks_again_after_the_server_restarts(tmp_path: Path) -> None:
    srv = start_nats(tmp_path / "nats")
    nc = await nats.connect(srv.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    js = nc.jetstream()
    await js.add_stream(name="RESTART", subjects=["restart.>"])
    await js.add_consumer("RESTART", ConsumerConfig(durable_name="c", ack_wait=30))
    handled: list[bytes] = []

    async def handler(msgs: list[Msg]) -> None:
        handled.extend(m.data for m in msgs)
        await asyncio.gather(*(m.ack() for m in msgs))

    loop = asyncio.ensure_future(pull_loop(nc, "RESTART", "c", "restart.>", 16, handler))
    try:
        await js.publish("restart.a", b"before")
        await wait_until(lambda: handled == [b"before"], 15)
        srv.process.kill()  # the server forgets the open pull request
        srv.process.wait()
        srv = start_nats(tmp_path / "nats", port=srv.port)
        await wait_until(lambda: nc.is_connected, 30)
        for _ in range(50):  # JetStream answers a moment after the server accepts connections
            try:
                await js.publish("restart.a", b"after", timeout=0.5)
                break
            except nats.errors.TimeoutError:
                continue
        sent = time.monotonic()
        await wait_until(lambda: handled == [b"before", b"after"], 10)
        assert time.monotonic() - sent < PULL_EXPIRES_S  # not left waiting for the old request to expire
    finally:
        await cancel_until_done([loop])
        await nc.close()
        srv.stop()


async def wait_until(cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_provisioning_again_brings_a_kept_consumer_to_the_changed_redelivery_settings(
        nats_server: ServerProcess) -> None:
    from shared.bus.runtime import ensure_consumer
    from shared.settings import Settings

    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(name="REPROVISION", subjects=["reprovision.>"])
    try:
        old, new = Settings(max_deliver=3, ack_wait_s=1.0), Settings(max_deliver=6, ack_wait_s=2.0)
        await ensure_consumer(js, "REPROVISION", "c", "reprovision.>", old)  # yesterday's deployment
        await ensure_consumer(js, "REPROVISION", "c", "reprovision.>", new)  # GANTRY_MAX_DELIVER changed since
        config = (await js.consumer_info("REPROVISION", "c")).config
        assert (config.max_deliver, config.ack_wait, config.backoff) == (6, 2.0, [2.0, 4.0, 8.0, 16.0, 32.0])
    finally:
        await js.delete_stream("REPROVISION")
        await nc.close()


async def test_a_message_a_consumer_gives_up_on_is_read_back_for_its_dead_letter(nats_server: ServerProcess) -> None:
    from shared.bus.exhausted import watch_exhausted

    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(name="EXHAUST", subjects=["exhaust.>"])
    await js.add_consumer("EXHAUST", ConsumerConfig(durable_name="c", ack_wait=0.5, max_deliver=2))
    given_up: list[tuple[str, bytes, int]] = []

    async def on_exhausted(subject: str, data: bytes, deliveries: int) -> None:
        given_up.append((subject, data, deliveries))

    await watch_exhausted(nc, "EXHAUST", "c", on_exhausted)
    try:
        await js.publish("exhaust.a", b"work")
        sub = await js.pull_subscribe_bind("c", "EXHAUST")
        for _ in range(2):  # delivered twice and never acknowledged: a handler killed each time
            assert [m.data for m in await sub.fetch(1, timeout=5)] == [b"work"]
            await asyncio.sleep(0.7)
        with contextlib.suppress(nats.errors.TimeoutError):  # the next pull (a service always has one open)
            await sub.fetch(1, timeout=1)
        deadline = time.monotonic() + 10
        while not given_up:
            assert time.monotonic() < deadline, "no max-deliveries advisory handed on"
            await asyncio.sleep(0.05)
        assert given_up == [("exhaust.a", b"work", 2)]
    finally:
        await js.delete_stream("EXHAUST")
        await nc.close()


async def test_a_full_commands_stream_refuses_new_commands_and_keeps_the_unread_ones(
        nats_server: ServerProcess) -> None:
    import nats.js.errors
    from nats.js.api import AckPolicy

    from shared.bus.streams import STREAM_CMD, stream_configs
    from shared.settings import Settings

    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_stream(STREAM_CMD)
    try:
        await js.add_stream(next(c for c in stream_configs(Settings(js_storage="memory")) if c.name == STREAM_CMD))
        await js.add_consumer(STREAM_CMD, ConsumerConfig(durable_name="reconciler-cmd", ack_policy=AckPolicy.EXPLICIT,
                                                         filter_subject="gantry.cmd.>"))
        await js.publish("gantry.cmd.scale", b'{"model": "llama-70b", "replicas": 4}')  # not read yet
        refused = None
        for _ in range(40):  # ~20 MiB of later commands, the reconciler away
            try:
                await js.publish("gantry.cmd.scale", b"x" * (512 << 10))
            except nats.js.errors.APIError as err:
                refused = err
                break
        assert refused is not None  # the sender hears it (before: the oldest, unread command was dropped instead)
        sub = await js.pull_subscribe("gantry.cmd.>", durable="reconciler-cmd", stream=STREAM_CMD)
        assert (await sub.fetch(1, timeout=5))[0].data.startswith(b'{"model": "llama-70b"')
    finally:
        await js.delete_stream(STREAM_CMD)
        await nc.close()


async def test_a_redelivery_arrives_behind_newer_messages_and_in_stream_order_puts_it_first(
        nats_server: ServerProcess) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(name="REDELIVER", subjects=["redeliver.>"])
    await js.add_consumer("REDELIVER", ConsumerConfig(durable_name="c", ack_wait=0.5))
    batches: list[list[Msg]] = []
    pc = PullConsumer(nc, "REDELIVER", "c", "redeliver.>", 16, lambda msgs: handle(msgs))

    async def handle(msgs: list[Msg]) -> None:
        batches.append(msgs)
        if len(batches) == 1:  # holds "older" unacknowledged (a consumer about to die) while "newer" comes in
            await js.publish("redeliver.a", b"newer")
            await wait_until(lambda: pc.arrived.qsize() >= 2, 15)  # "newer", then "older" once its ack wait ran out
            return
        await asyncio.gather(*(m.ack() for m in msgs))

    await js.publish("redeliver.a", b"older")
    loop = asyncio.ensure_future(pc.run())
    try:
        await wait_until(lambda: len(batches) >= 2, 15)
        second = batches[1][:2]
        assert [(m.data, m.metadata.num_delivered) for m in second] == [(b"newer", 1), (b"older", 2)]
        assert [m.data for m in in_stream_order(second)] == [b"older", b"newer"]
    finally:
        await cancel_until_done([loop])
        await js.delete_stream("REDELIVER")
        await nc.close()


async def test_messages_delivered_behind_a_long_batch_spend_no_delivery_while_it_runs(
        nats_server: ServerProcess) -> None:
    """A batch may take minutes (a stage holding its outputs until a full stream has room): what the open request
    delivered behind it is kept in progress meanwhile, not delivered again at each ack wait until dead-lettered."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await js.add_stream(name="BEHIND", subjects=["behind.>"])
    await js.add_consumer("BEHIND", ConsumerConfig(durable_name="c", ack_wait=1.0, max_deliver=3))
    batches: list[list[Msg]] = []
    pc = PullConsumer(nc, "BEHIND", "c", "behind.>", 16, lambda msgs: handle(msgs), keep_every=0.25)

    async def handle(msgs: list[Msg]) -> None:
        batches.append(msgs)
        await asyncio.gather(*(m.ack() for m in msgs))
        if len(batches) == 1:  # a long batch: three ack waits of the message that arrives behind it
            await js.publish("behind.a", b"behind")
            await asyncio.sleep(3.5)

    await js.publish("behind.a", b"first")
    loop = asyncio.ensure_future(pc.run())
    try:
        await wait_until(lambda: len(batches) >= 2, 15)
        await asyncio.sleep(1.5)  # a redelivery, had there been one, would come within an ack wait
        later = [(m.data, m.metadata.num_delivered) for b in batches[1:] for m in b]
        assert later == [(b"behind", 1)]
    finally:
        await cancel_until_done([loop])
        await js.delete_stream("BEHIND")
        await nc.close()
