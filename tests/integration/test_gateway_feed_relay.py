"""The picker's engine-feed relay with a real nats-server and its real child process: every engine report
reaches the picker once, each kind (load reports, KV events) in the order published, several per frame; a
child that dies is replaced and the feed goes on; a child whose picker is gone (its stdin closed) exits by
itself."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import nats
import psutil
import pytest

from ops.servers import ServerProcess
from services.gateway.feed_relay import LENGTH, NATS_URL_ENV, FeedRelay, Kind, Relayed, unframe
from services.gateway.listen import ListenError
from services.gateway.protocol import GRPC_SOCKET
from services.gateway.service import Gateway, GatewayOptions
from shared.bus import subjects
from tests.integration.test_gateway import REPO

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def _until(cond: Callable[[], bool], state: Callable[[], object], timeout: float = 30.0) -> None:
    """Until ``cond`` holds; a failure says what ``state`` was (what arrived so far)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"not met in {timeout} s: {state()}"
        await asyncio.sleep(0.01)


async def _publish(url: str, instance: str, first: int, n: int) -> list[tuple[Kind, bytes]]:
    """``n`` KV-event and metrics messages, alternating; what was sent, in order."""
    sent: list[tuple[Kind, bytes]] = []
    nc = await nats.connect(url)
    for i in range(first, first + n):
        kind = Kind.KV if i % 2 else Kind.METRICS
        subject = subjects.engine_kv_events(instance) if kind is Kind.KV else subjects.engine_metrics(instance)
        await nc.publish(subject, b"message %d" % i)
        sent.append((kind, b"message %d" % i))
    await nc.flush()
    await nc.close()
    return sent


def _by_kind(msgs: list[Relayed] | list[tuple[Kind, bytes]]) -> dict[Kind, list[bytes]]:
    """Each subscription's messages in order (as on the picker's own loop, the two subscriptions' messages
    are not ordered between them: nats-py delivers each through its own task)."""
    pairs = [(m.kind, m.data) if isinstance(m, Relayed) else m for m in msgs]
    return {k: [d for kind, d in pairs if kind is k] for k in Kind}


def test_reports_arrive_once_in_order_batched_and_a_dead_child_is_replaced(nats_server: ServerProcess) -> None:
    async def scenario() -> None:
        got: list[Relayed] = []

        async def deliver(batch: list[Relayed]) -> None:
            got.extend(m for m in batch if m.subject.endswith(".relay-test"))
            if any(m.data == b"message 3" for m in batch):
                raise RuntimeError("a feed bug")  # logged; the frame's messages were taken, the feed goes on

        relay = FeedRelay(nats_server.url, 0.05, deliver)
        await relay.start()
        task = asyncio.create_task(relay.run())
        try:
            t0 = time.time()
            sent = await _publish(nats_server.url, "relay-test", 0, 40)
            await _until(lambda: len(got) >= len(sent), lambda: (len(got), relay.frames, relay.starts))
            assert _by_kind(got) == _by_kind(sent)
            assert all(t0 <= m.at <= time.time() for m in got)
            assert relay.frames < len(sent)  # several messages per wake-up of the picker

            first = relay.proc
            assert first is not None
            first.kill()
            await _until(lambda: relay.starts == 2, lambda: (relay.starts, relay.proc))  # another child subscribed
            assert relay.proc is not first
            got.clear()
            sent = await _publish(nats_server.url, "relay-test", 40, 10)
            await _until(lambda: len(got) >= len(sent), lambda: (len(got), relay.frames, relay.starts))
            assert _by_kind(got) == _by_kind(sent)
        finally:
            task.cancel()
            await relay.stop()

    asyncio.run(scenario())


def test_the_child_exits_when_its_picker_is_gone(nats_server: ServerProcess) -> None:
    child = subprocess.Popen([sys.executable, "-m", "services.gateway.feed_relay"], cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, env={**os.environ, NATS_URL_ENV: nats_server.url})
    try:
        assert child.stdout is not None and child.stdin is not None
        (n,) = LENGTH.unpack(child.stdout.read(LENGTH.size))
        assert unframe(child.stdout.read(n)) == []  # ready: subscribed
        child.stdin.close()  # what the kernel does when the picker dies, however it dies
        assert child.wait(10) == 0
    finally:
        if child.poll() is None:
            child.kill()


def test_a_picker_that_fails_to_start_leaves_no_feed_relay_child_behind(nats_server: ServerProcess,
                                                                        tmp_path: Path) -> None:
    """The relay child is started before the listeners; one that cannot bind (here: its socket path is taken by
    a file) ends the start-up, and the child with it, while the process that ran the picker lives on."""
    me = psutil.Process()

    def relay(p: psutil.Process) -> bool:
        try:
            return p.status() != psutil.STATUS_ZOMBIE and "feed_relay" in " ".join(p.cmdline())
        except psutil.NoSuchProcess:  # another child of this process that ended meanwhile
            return False

    def relays() -> list[psutil.Process]:
        return [p for p in me.children(recursive=True) if relay(p)]

    async def start_and_fail(sockets: Path) -> Gateway:
        gw = Gateway(GatewayOptions(nats_url=nats_server.url, eds_path=tmp_path / "eds" / "e.json",
                                    socket_dir=sockets, feed_window_s=0.01))
        with pytest.raises(ListenError, match="not a socket"):
            await gw.run()
        return gw

    assert relays() == []
    with tempfile.TemporaryDirectory(prefix="gf-") as d:
        (Path(d) / GRPC_SOCKET).write_text("taken")
        loop = asyncio.new_event_loop()
        try:
            gw = loop.run_until_complete(start_and_fail(Path(d)))
            assert gw.relay is not None and gw.relay.starts == 1  # it had started
            assert relays() == []  # checked while the loop (and the picker's process) still live
        finally:
            loop.close()


def test_a_burst_of_large_messages_goes_out_in_frames_within_the_budget_not_one_past_the_readers_bound(
        nats_server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    # a long window gathering a burst of 8 MB messages made one frame past MAX_FRAME_BYTES: the picker then ended
    # the child and lost every engine's reports in that frame
    from services.gateway import feed_relay

    budget, size, n = 1 << 20, 300_000, 12
    monkeypatch.setattr(feed_relay, "FRAME_BUDGET_BYTES", budget, raising=False)
    frames: list[list[Relayed]] = []
    out_r, out_w = os.pipe()
    in_r, in_w = os.pipe()

    def reader() -> None:  # the picker's side: reads as the child writes (its writes block on a full pipe)
        with os.fdopen(out_r, "rb") as pipe:
            while head := pipe.read(LENGTH.size):
                (length,) = LENGTH.unpack(head)
                frames.append(unframe(pipe.read(length)))

    async def scenario() -> None:
        child = asyncio.create_task(feed_relay.relay(nats_server.url, 1.0, out_w, in_r))
        await _until(lambda: len(frames) >= 1, lambda: frames)  # the ready frame
        nc = await nats.connect(nats_server.url)
        for i in range(n):
            await nc.publish(subjects.engine_kv_events("burst"), bytes([i]) * size)
        await nc.flush()
        await nc.close()
        await _until(lambda: sum(len(f) for f in frames) >= n, lambda: [len(f) for f in frames], timeout=20)
        os.close(in_w)
        await asyncio.wait_for(child, 10)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        asyncio.run(scenario())
    finally:
        os.close(out_w)  # (the child took ``in_r`` and closed it)
        thread.join(5)
    got = frames[1:]
    assert [m.data[0] for f in got for m in f] == list(range(n))  # every message, in order
    assert len(got) > 1 and all(sum(len(m.data) for m in f) <= budget for f in got)
