"""The ZMQ replay endpoint (``--kv-events-replay-endpoint``): a subscriber that joined late or saw a gap in the
sequence frame asks for every kept batch from a number on, in vLLM's replay protocol, and a requester that sends
garbage, floods or never reads never stalls the server. Real pyzmq sockets; every wait polls for its condition
until a generous deadline (a loaded host may be slow)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from ops.servers import free_port
from services.engine_server.kv_replay import END_SEQ, ReplayBuffer, ReplayDesk
from services.engine_server.server import EmbeddedServer, ServerOptions, build, parse_args
from services.engine_server.zmq_replay import ZmqReplayServer
from shared.core.kv_events import BlockStored, chain_hashes, decode_batch

zmq = pytest.importorskip("zmq")
zmq_asyncio = pytest.importorskip("zmq.asyncio")

DEADLINE_S = 30.0
LABELS = '{engine="0",model_name="m"}'


def _seq(n: int) -> bytes:
    return n.to_bytes(8, "big")


async def _until(cond: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        got = cond()
        if got if isinstance(got, bool) else await got:
            return
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.01)


async def _replay(dealer: Any, start: bytes) -> list[tuple[int, bytes]]:
    """Ask for a replay from ``start`` (a DEALER adds the empty delimiter a REQ would) and read it to the end marker."""
    await dealer.send_multipart([b"", start])
    got = []
    while True:
        empty, seq, payload = await asyncio.wait_for(dealer.recv_multipart(), DEADLINE_S)
        assert empty == b""
        if seq == END_SEQ:
            assert payload == b""
            return got
        got.append((int.from_bytes(seq, "big"), payload))


async def _metric(srv: EmbeddedServer, sample: str) -> float:
    async with httpx.AsyncClient(base_url=srv.url) as http:
        text = (await http.get("/metrics")).text
    line = next((ln for ln in text.splitlines() if ln.startswith(sample + " ")), None)
    assert line is not None, f"{sample} is not on /metrics"
    return float(line.rsplit(" ", 1)[1])


@pytest.fixture
async def server() -> AsyncIterator[tuple[EmbeddedServer, str, str]]:
    pub, rep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    srv = EmbeddedServer(ServerOptions(port=free_port(), num_gpu_blocks=200, speedup=50.0, served_model_name="m",
                                       kv_events_zmq=pub, kv_events_replay_endpoint=rep, access_log=False))
    await srv.start()
    try:
        yield srv, pub, rep
    finally:
        await srv.stop()


@pytest.fixture
async def actx() -> AsyncIterator[Any]:
    ctx = zmq_asyncio.Context()
    yield ctx
    ctx.destroy(linger=0)


async def test_a_late_subscriber_sees_the_gap_and_replays_the_batches_it_missed(
        server: tuple[EmbeddedServer, str, str], actx: Any) -> None:
    srv, pub, rep = server
    early = list(range(100, 148))  # three full blocks, cached before anyone subscribed
    async with httpx.AsyncClient(base_url=srv.url) as http:
        r = await http.post("/v1/completions", json={"prompt": early, "max_tokens": 2, "ignore_eos": True})
        assert r.status_code == 200
        sub = actx.socket(zmq.SUB)
        sub.connect(pub)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        first: list[int] = []
        fresh = iter(range(200, 4000))  # a new prompt each time, so each caches a new block (a new batch)

        async def got_a_batch() -> bool:  # a PUB drops what it sends before the subscription arrives: keep sending
            r = await http.post("/v1/completions",
                                json={"prompt": [next(fresh)] * 20, "max_tokens": 1, "ignore_eos": True})
            assert r.status_code == 200
            if await sub.poll(100):
                first.append(int.from_bytes((await sub.recv_multipart())[1], "big"))
            return bool(first)

        await _until(got_a_batch, "the subscriber got a live batch")
    assert first[0] > 0  # the gap: batches 0 .. first-1 were sent before it joined
    dealer = actx.socket(zmq.DEALER)
    dealer.connect(rep)
    replayed = await _replay(dealer, _seq(0))
    seqs = [s for s, _ in replayed]
    assert seqs == list(range(len(seqs))) and seqs[-1] >= first[0] - 1  # the whole gap, in order
    stored = [e for _, p in replayed for e in decode_batch(p).events if isinstance(e, BlockStored)]
    assert chain_hashes(early, 16) == stored[0].block_hashes[:3]
    assert await _metric(srv, f"gantry:engine_zmq_kv_replays_total{LABELS}") == 1


@pytest.mark.parametrize("routing_id", [b"a" * 36, b"r" * 255], ids=["uuid-sized", "longest"])
async def test_a_requester_with_a_long_routing_id_is_served(
        server: tuple[EmbeddedServer, str, str], actx: Any, routing_id: bytes) -> None:
    # the frame-size bound also applies to the handshake that carries the id: at 64 bytes a str(uuid4()) id (36
    # bytes) was disconnected before its request arrived and waited for ever
    srv, _, rep = server
    async with httpx.AsyncClient(base_url=srv.url) as http:
        r = await http.post("/v1/completions", json={"prompt": list(range(100, 148)), "max_tokens": 1,
                                                      "ignore_eos": True})
        assert r.status_code == 200
    dealer = actx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.ROUTING_ID, routing_id)
    dealer.connect(rep)
    replayed = await _replay(dealer, _seq(0))
    assert replayed and replayed[0][0] == 0


async def test_a_malformed_request_gets_the_end_marker_is_counted_on_metrics_and_the_next_replay_works(
        server: tuple[EmbeddedServer, str, str], actx: Any) -> None:
    srv, _, rep = server
    dealer = actx.socket(zmq.DEALER)
    dealer.connect(rep)
    for bad in ([b"", b"\x00" * 7], [b"", _seq(0), b"extra"], [b"", (-5).to_bytes(8, "big", signed=True)],
                [b"", _seq(2 ** 62)]):
        await dealer.send_multipart(bad)
        assert await asyncio.wait_for(dealer.recv_multipart(), DEADLINE_S) == [b"", END_SEQ, b""]
    assert await _replay(dealer, _seq(0)) == []  # nothing published yet: a valid request, answered
    refused = 'gantry:engine_zmq_kv_replay_refused_total{engine="0",model_name="m",reason="malformed"}'
    assert await _metric(srv, refused) == 4
    assert await _metric(srv, f"gantry:engine_zmq_kv_replays_total{LABELS}") == 1


@pytest.fixture
def sync_sockets() -> Any:
    made: list[Any] = []

    def socket(kind: int, **opts: int) -> Any:
        sock = zmq.Context.instance().socket(kind)  # inproc: the replay server's context
        for opt, value in opts.items():
            sock.setsockopt(getattr(zmq, opt), value)
        made.append(sock)
        return sock

    yield socket
    for sock in made:
        sock.close(linger=0)


async def _collect(sock: Any, enough: Callable[[list[list[bytes]]], bool], what: str) -> list[list[bytes]]:
    """Read what arrives at ``sock`` (never blocking the loop the replay server runs on) until ``enough``."""
    got: list[list[bytes]] = []

    def read() -> bool:
        with contextlib.suppress(zmq.Again):
            while True:
                got.append(sock.recv_multipart(flags=zmq.NOBLOCK))
        return enough(got)

    await _until(read, what)
    return got


async def test_a_requester_that_never_reads_is_abandoned_after_the_stall_time_while_others_are_served(
        sync_sockets: Any) -> None:
    buf = ReplayBuffer(5_000)
    for i in range(5_000):
        buf.add(b"%d" % i)
    desk = ReplayDesk(buf, stall_s=0.2)
    server = ZmqReplayServer("inproc://gantry-test-replay-stall", desk)
    task = asyncio.create_task(server.run())
    try:
        idle = sync_sockets(zmq.DEALER, RCVHWM=10)  # its pipe holds the router's 1,000 and its own 10
        idle.connect(server.endpoint)
        idle.send_multipart([b"", _seq(0)])  # ... and it never reads: its replay of 5,000 blocks
        reader = sync_sockets(zmq.DEALER)
        reader.connect(server.endpoint)
        reader.send_multipart([b"", _seq(4_990)])
        got = await _collect(reader, lambda got: bool(got) and got[-1][1] == END_SEQ, "the reader's replay ended")
        assert [int.from_bytes(f[1], "big") for f in got[:-1]] == list(range(4_990, 5_000))
        await _until(lambda: desk.refused["abandoned"] == 1, "the idle requester's replay was abandoned")
        assert desk.in_progress() == []
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        server.close()


async def test_a_flood_of_malformed_requests_is_each_answered_and_counted_and_a_valid_one_after_it_is_served(
        sync_sockets: Any) -> None:
    buf = ReplayBuffer(10)
    buf.add(b"only")
    desk = ReplayDesk(buf)
    server = ZmqReplayServer("inproc://gantry-test-replay-flood", desk)
    task = asyncio.create_task(server.run())
    try:
        dealer = sync_sockets(zmq.DEALER)
        dealer.connect(server.endpoint)
        for _ in range(500):
            dealer.send_multipart([b"", b"\x01\x02"])
        dealer.send_multipart([b"", _seq(0)])
        got = await _collect(dealer, lambda got: len(got) >= 502, "every request was answered")
        assert got[:500] == [[b"", END_SEQ, b""]] * 500
        assert got[500:] == [[b"", _seq(0), b"only"], [b"", END_SEQ, b""]]
        assert desk.refused["malformed"] == 500 and desk.replays == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        server.close()


def test_the_replay_endpoint_needs_zmq_kv_events(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--kv-events-replay-endpoint", "tcp://*:5558"])
    assert exc.value.code != 0 and "--kv-events-zmq" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["0", "-1", "1000001", "10000000"])
def test_the_replay_buffer_bound_is_refused_outside_its_range(size: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--kv-events-zmq", "tcp://*:5557", "--kv-events-replay-endpoint", "tcp://*:5558",
                    "--kv-events-replay-buffer", size])
    assert exc.value.code != 0 and "--kv-events-replay-buffer" in capsys.readouterr().err


def test_the_replay_flags_reach_the_server_options_with_vllms_default_buffer() -> None:
    opts = parse_args(["--kv-events-zmq", "tcp://*:5557", "--kv-events-replay-endpoint", "tcp://*:5558"])
    assert opts.kv_events_replay_endpoint == "tcp://*:5558" and opts.kv_events_replay_buffer == 10_000


def test_a_replay_endpoint_that_cannot_be_bound_is_an_error_naming_the_flag() -> None:
    with pytest.raises(ValueError, match="--kv-events-replay-endpoint: cannot bind nonsense://x"):
        build(ServerOptions(kv_events_zmq="inproc://gantry-test-replay-bind", kv_events_replay_endpoint="nonsense://x",
                            access_log=False))
