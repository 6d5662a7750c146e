"""Envoy closes its idle connections to the picker before the picker would, so the picker's idle close never
races a check Envoy is writing; and when it does (the picker's idle timeout set below Envoy's), the check is sent
again and the client sees nothing: real Envoy on the ext_authz transport, the picker's own HTTP/1.1 server (its
framing and idle sweep) in this process answering checks and ``/v1/models``."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from ops.envoy import EnvoyOptions, admin_get, start_envoy
from ops.servers import free_port
from services.gateway.authz import AuthzPicker
from services.gateway.calls import picker_methods
from services.gateway.h2grpc import H2Connection
from services.gateway.http1 import Connections, OneByOne, headers_of, response
from services.gateway.protocol import CHECK_PREFIX, HEALTH_PATH, PickerTransport
from tests.integration.test_gateway import gateway_marks
from tests.unit.services.test_gateway_picker import picker, report

pytestmark = gateway_marks(60)

PICKER_IDLE_S = 1.0  # Envoy's: half of it


def _answer(head: bytes, _body: bytes) -> bytes:
    """Every check refused with 429 (a check Envoy could not get answered would be its 500 instead), the
    health check and ``/v1/models`` answered 200."""
    path = headers_of(head)[":path"]
    if path.startswith(CHECK_PREFIX):
        return response(429, b"{}")
    return response(200, b"ok" if path == HEALTH_PATH else b'{"data": []}')


async def test_checks_before_and_after_an_idle_spell_are_answered_and_envoy_closes_first(tmp_path: Path) -> None:
    conns = Connections(PICKER_IDLE_S, max_connections=64)
    sweeping = asyncio.create_task(conns.sweep_forever())
    server = await asyncio.get_running_loop().create_server(lambda: OneByOne(_answer, conns=conns), "127.0.0.1", 0)
    opts = EnvoyOptions(listen_port=free_port(), admin_port=free_port(), epp_port=server.sockets[0].getsockname()[1],
                        als_port=free_port(), eds_path=tmp_path / "eds" / "engines.json",
                        transport=PickerTransport.EXT_AUTHZ, picker_idle_timeout_s=PICKER_IDLE_S,
                        epp_health_interval_s=0.1)  # the health check's connection is never idle for long
    envoy = await asyncio.to_thread(start_envoy, opts, tmp_path / "envoy", 60)
    try:
        async with httpx.AsyncClient(base_url=envoy.url, timeout=10) as client:
            async def exchange() -> list[int]:
                check = await client.post("/v1/chat/completions", json={"model": "m"})
                models = await client.get("/v1/models")
                return [check.status_code, models.status_code]

            assert await exchange() == [429, 200]
            await asyncio.sleep(2 * PICKER_IDLE_S)  # idle: Envoy's timeout and the picker's both pass
            assert await exchange() == [429, 200]
        stats = await asyncio.to_thread(admin_get, opts.admin_port, "/stats?filter=gantry_epp.upstream_cx_idle_timeout")
        closed_by_envoy = re.search(r"upstream_cx_idle_timeout: (\d+)", stats)
        assert closed_by_envoy is not None and int(closed_by_envoy.group(1)) >= 1
        assert conns.idle_closed == 0  # the picker's sweep found none of Envoy's connections idle
    finally:
        await asyncio.to_thread(envoy.stop)
        sweeping.cancel()
        server.close()


def _unread_request(conns: Connections) -> OneByOne | None:
    """The picker connection holding a check (or a ``/v1/models``) the picker has not read yet (peeked at, left in
    place), if any."""
    for conn in list(conns.open):
        if conn.transport is None:
            continue
        with socket.socket(fileno=os.dup(conn.transport.get_extra_info("socket").fileno())) as peek:
            try:
                head = peek.recv(16, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
        if head.startswith((b"POST " + CHECK_PREFIX.encode(), b"GET /v1/models")):
            return conn
    return None


def _pooled(admin: int) -> int:
    """The connections Envoy holds open to the picker for checks (its health checks' not counted)."""
    stats = admin_get(admin, "/stats?filter=gantry_epp.upstream_cx_active$")
    found = re.search(r"upstream_cx_active: (\d+)", stats)
    return int(found.group(1)) if found else 0


def _retries(admin: int) -> int:
    stats = admin_get(admin, "/stats?filter=gantry_epp.upstream_rq_retry$")
    found = re.search(r"upstream_rq_retry: (\d+)", stats)
    return int(found.group(1)) if found else 0


async def test_a_check_racing_the_pickers_idle_close_is_sent_again_and_no_client_request_fails(
        tmp_path: Path) -> None:
    """The picker's idle timeout below Envoy's (an operator gave them apart): the picker's sweep closes Envoy's pooled
    connection at the worst moment, with a request on the wire that it has not read, in each of 4 rounds (one with a
    long prompt, a check body of 100 kB; one ``/v1/models``, routed to the picker as an ordinary upstream). The
    picker's own ext_authz answers, one engine in its pool: each chat completion is booked once, never twice."""
    conns = Connections(PICKER_IDLE_S, max_connections=64)  # no sweep task: this test sweeps, at the worst moment
    authz = AuthzPicker(picker(report("a", free_port()))[0], conns)
    server = await asyncio.get_running_loop().create_server(lambda: OneByOne(authz.answer, conns=conns), "127.0.0.1",
                                                            0)
    opts = EnvoyOptions(listen_port=free_port(), admin_port=free_port(), epp_port=server.sockets[0].getsockname()[1],
                        als_port=free_port(), eds_path=tmp_path / "eds" / "engines.json",
                        transport=PickerTransport.EXT_AUTHZ, picker_idle_timeout_s=120.0)  # Envoy's: 60 s
    envoy = await asyncio.to_thread(start_envoy, opts, tmp_path / "envoy", 60)
    assert isinstance(opts.admin_port, int)
    try:
        with httpx.Client(base_url=envoy.url, timeout=30) as client, ThreadPoolExecutor(1) as pool:
            def ask(prompt: str) -> int:
                """A chat completion (routed by the picker's answer to an engine Envoy does not know: its 503; a
                failed check is Envoy's 500), or with "models" ``/v1/models`` (the picker's 200)."""
                if prompt == "models":
                    return client.get("/v1/models").status_code
                body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
                return client.post("/v1/chat/completions", json=body).status_code

            chats = 0
            for prompt, picker_answer in (("short", 503), ("long " * 20_000, 503), ("models", 200), ("short", 503)):
                # Envoy must pool a connection to the picker first: the loop is held below, so a connection opened
                # for the request would never be accepted. Its pool is empty at the start, and again whenever the
                # previous race's reset ejected the picker (a local-origin failure), which drains the pool.
                while await asyncio.to_thread(_pooled, opts.admin_port) == 0:
                    assert await asyncio.to_thread(ask, "warm") == 503
                    chats += 1
                # From here to the await, the picker's loop is held: the request Envoy writes stays unread, as
                # when it arrives in the very turn the sweep closes its connection.
                conns.sweep(time.monotonic())  # every connection quiet from now on
                sent = pool.submit(ask, prompt)
                deadline = time.monotonic() + 30
                while (racing := _unread_request(conns)) is None:
                    assert time.monotonic() < deadline, "Envoy never wrote the request"
                    time.sleep(0.001)
                conns.sweep(time.monotonic() + PICKER_IDLE_S)  # the picker's idle close, the request unread
                assert racing not in conns.open
                assert await asyncio.wrap_future(sent) == picker_answer  # answered by the picker, not Envoy's 500
                chats += prompt != "models"
        assert await asyncio.to_thread(_retries, opts.admin_port) >= 4  # each race was met, and sent again
        # each raced chat's first check was never read: one pick and one booking per chat (no access log here to
        # end them)
        assert authz.picker.counters.picks == chats and len(authz.inflight) == chats
    finally:
        await asyncio.to_thread(envoy.stop)
        server.close()


GOAWAY = 0x7  # HTTP/2 frame type


class GoawayDelay:
    """A TCP relay between Envoy and the picker's gRPC port that holds back a GOAWAY from the picker (and what
    follows it: the close) until Envoy has written more on that connection: the picker's idle close and a new
    stream from Envoy then cross, as they do when a request arrives while the GOAWAY is on the wire."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.held = 0  # GOAWAYs held back
        self.crossed = 0  # of them, delivered only after Envoy wrote behind them
        self._quiet: set[asyncio.StreamWriter] = set()  # Envoy's side of each relayed connection without a GOAWAY

    def drop_quiet(self) -> None:
        """Close the relayed connections that got no GOAWAY (Envoy opens new ones)."""
        for envoy_w in self._quiet:
            envoy_w.close()

    async def relay(self, envoy_r: asyncio.StreamReader, envoy_w: asyncio.StreamWriter) -> None:
        """One connection from Envoy, relayed to the picker until either side closes."""
        picker_r, picker_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        held: list[bytes] = []  # from the GOAWAY on
        picker_done = asyncio.Event()
        self._quiet.add(envoy_w)

        async def down() -> None:  # the picker's bytes, frame by frame
            buf = b""
            while chunk := await picker_r.read(65536):
                buf += chunk
                while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                    size = 9 + int.from_bytes(buf[:3], "big")
                    frame, buf = buf[:size], buf[size:]
                    if not held and frame[3] == GOAWAY:
                        self.held += 1
                        self._quiet.discard(envoy_w)
                    if held or frame[3] == GOAWAY:
                        held.append(frame)
                    else:
                        envoy_w.write(frame)
            picker_done.set()
            if not held:
                envoy_w.close()

        async def up() -> None:  # Envoy's bytes; once a GOAWAY is held, the next ones release it
            while chunk := await envoy_r.read(65536):
                if held:
                    self.crossed += 1
                    await picker_done.wait()  # the picker closed behind its GOAWAY: Envoy learns both now
                    for frame in held:
                        envoy_w.write(frame)
                    envoy_w.close()
                    return
                picker_w.write(chunk)
            picker_w.close()

        await asyncio.gather(down(), up(), return_exceptions=True)
        self._quiet.discard(envoy_w)
        envoy_w.close()
        picker_w.close()


async def _held_within(delay: GoawayDelay, before: int, timeout: float) -> bool:
    """Whether the relay holds a new GOAWAY (more than ``before``) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while delay.held == before:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def test_an_ext_proc_stream_racing_the_pickers_idle_goaway_is_retried_and_no_client_request_fails(
        tmp_path: Path) -> None:
    """The picker's gRPC idle timeout below Envoy's: its idle close is a GOAWAY naming the last stream it took,
    then the close, so a stream Envoy starts while the GOAWAY is on the wire is never taken; Envoy sends it again
    (its ext_proc retry policy), and the client never sees it. 2 asks crossed."""
    conns = Connections(1.0, 64)
    sweeping = asyncio.create_task(conns.sweep_forever())
    p, _ = picker()  # no engine: every request is refused by the picker itself (its own answer, not Envoy's 500)
    server = await asyncio.get_running_loop().create_server(
        lambda: H2Connection(picker_methods(p, None), conns, 1 << 20), "127.0.0.1", 0)
    grpc_port = server.sockets[0].getsockname()[1]
    delay = GoawayDelay(grpc_port)
    relay = await asyncio.start_server(delay.relay, "127.0.0.1", 0)
    opts = EnvoyOptions(listen_port=free_port(), admin_port=free_port(), epp_port=relay.sockets[0].getsockname()[1],
                        eds_path=tmp_path / "eds" / "engines.json", picker_idle_timeout_s=120.0,  # Envoy's: 60 s
                        epp_health_interval_s=0.1)  # the health checks' connection never idle for 1 s
    envoy = await asyncio.to_thread(start_envoy, opts, tmp_path / "envoy", 60)
    try:
        async with httpx.AsyncClient(base_url=envoy.url, timeout=30) as client:
            async def ask() -> int:
                chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
                return (await client.post("/v1/chat/completions", json=chat)).status_code

            refused = await ask()
            assert refused == 503  # the picker's refusal: no engine (a failed stream is Envoy's 500)
            asks_crossed = 0
            for _ in range(12):
                if asks_crossed == 2:
                    break
                # the sweep closes an idle connection within 1.5 s; should a GOAWAY not come (a loaded host),
                # the quiet connections are dropped and the next one waited for
                if await _held_within(delay, delay.held, 10.0):
                    crossed = delay.crossed
                    assert await ask() == refused  # crossed the GOAWAY; sent again, answered by the picker
                    # On a loaded host the health checks' connection can be the one that idled: its next check
                    # crosses the GOAWAY instead, the ask takes the other connection, and the round is not counted.
                    asks_crossed += delay.crossed > crossed
                else:
                    delay.drop_quiet()
                    assert await ask() == refused
            assert asks_crossed == 2
    finally:
        await asyncio.to_thread(envoy.stop)
        relay.close()
        sweeping.cancel()
        server.close()
