"""CPU that mutual TLS adds to one ext_authz check on the picker's TCP listener (``--tls-dir``), in process.

Why: the TLS option must show what it costs on the check path; wall latency on this shared 2-core host moves with
load, thread CPU time much less. The default path (unix sockets, no TLS) does not change: this measures the
opt-in one only.

Setup: ``bench/gateway_check.py``'s picker (one engine, the same ~60-token chats, the default profile), each check
sent as Envoy sends it over one kept-alive connection that the running uvloop serves as an accepted one (a real
socket pair, the picker's ``OneByOne``/``Connections``), either plain or with the picker's TLS server context
(``services.gateway.tls.server_context``, client certificate required; files from ``ops.tls``) and an in-process
client holding Envoy's certificate (``ssl.SSLObject`` over memory buffers: its handshake is done once per run, as
Envoy keeps its connections). Per check: thread CPU from the request's bytes leaving the client to the answer read
back, everything in this one thread (the loop, the picker, both ends' TLS). ``client_tls_us`` is the client's own
encrypting and decrypting inside that (Envoy's share, done in Envoy, not in the picker); ``picker_us`` the rest.
The two variants run interleaved, the order alternating, for an A/B in one window.

Run: ``.venv/bin/python bench/gateway_check_tls.py [--runs 5] [--checks 2000] [--cold-checks 200] [--gap-ms 10]``.
Prints one JSON line per run and a summary line per variant (medians of the runs); writes nothing but a temporary
TLS directory.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


from bench.gateway_check import Bench, _p, interleaved, requests  # noqa: E402
from ops.tls import ensure_picker_tls  # noqa: E402
from services.gateway.http1 import Connections, OneByOne  # noqa: E402
from services.gateway.protocol import PICKER_IDLE_TIMEOUT_S, PICKER_MAX_CONNECTIONS  # noqa: E402
from services.gateway.tls import PICKER_NAME, envoy_files, picker_files, server_context  # noqa: E402


def _complete(buf: bytes) -> bool:
    """Whether ``buf`` holds a whole HTTP/1.1 answer (head and its content-length of body)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return False
    length = 0
    for line in buf[:end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return len(buf) >= end + 4 + length


class Client:
    """Envoy's end of one connection to the picker: plain, or TLS with Envoy's certificate over memory BIOs."""

    def __init__(self, sock: socket.socket, tls_dir: Path | None) -> None:
        self.sock = sock
        self.tls: ssl.SSLObject | None = None
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls_s = 0.0  # thread CPU in this end's TLS (encrypting and decrypting), since the last reset
        if tls_dir is not None:
            files = envoy_files(tls_dir)
            ctx = ssl.create_default_context(cafile=str(files.ca))
            ctx.load_cert_chain(files.cert, files.key)
            self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=PICKER_NAME)

    async def handshake(self) -> None:
        """Complete the TLS handshake (once: Envoy keeps its connection)."""
        assert self.tls is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await loop.sock_sendall(self.sock, self.outgoing.read())
                self.incoming.write(await loop.sock_recv(self.sock, 1 << 16))
        await loop.sock_sendall(self.sock, self.outgoing.read())

    async def exchange(self, request: bytes) -> bytes:
        """Send ``request``, return the whole answer."""
        loop = asyncio.get_running_loop()
        if self.tls is None:
            await loop.sock_sendall(self.sock, request)
        else:
            t0 = time.thread_time()
            self.tls.write(request)
            wire = self.outgoing.read()
            self.tls_s += time.thread_time() - t0
            await loop.sock_sendall(self.sock, wire)
        got = b""
        while not _complete(got):
            data = await loop.sock_recv(self.sock, 1 << 16)
            if not data:
                raise RuntimeError("the picker closed the connection")
            if self.tls is None:
                got += data
                continue
            t0 = time.thread_time()
            self.incoming.write(data)
            try:
                while True:
                    got += self.tls.read(1 << 16)
            except ssl.SSLWantReadError:
                pass
            self.tls_s += time.thread_time() - t0
        return got


async def run(checks: int, cold_checks: int, gap_s: float, start: int, tls_dir: Path | None) -> dict[str, Any]:
    """One run over a fresh connection: ``checks`` back to back, then ``cold_checks`` each after ``gap_s`` of
    sleep (µs of thread CPU per check)."""
    b = Bench()
    loop = asyncio.get_running_loop()
    server_end, peer = socket.socketpair()
    peer.setblocking(False)
    protocol = OneByOne(b.authz.answer, conns=Connections(PICKER_IDLE_TIMEOUT_S, PICKER_MAX_CONNECTIONS))
    ctx = server_context(picker_files(tls_dir)) if tls_dir is not None else None
    accepted = asyncio.ensure_future(loop.connect_accepted_socket(lambda: protocol, server_end, ssl=ctx))
    client = Client(peer, tls_dir)
    if tls_dir is not None:
        await client.handshake()
    await accepted

    async def check(request: bytes) -> tuple[float, float]:
        b.tick()
        client.tls_s = 0.0
        t0 = time.thread_time()
        got = await client.exchange(request)
        spent = time.thread_time() - t0
        b.settle(got.split(b"\r\n\r\n", 1)[0] + b"\r\n")  # the answer's head holds the pick id
        return spent, client.tls_s

    hot = [await check(h + b"\r\n\r\n" + p) for h, p in requests(start, checks)]
    cold = []
    for h, p in requests(start + checks, cold_checks):
        time.sleep(gap_s)  # the whole process idle, as between two checks at 100 requests/s
        cold.append(await check(h + b"\r\n\r\n" + p))
    if protocol.transport is not None:
        protocol.transport.close()
    peer.close()
    whole = [s for s, _ in hot]
    return {"hot_us_mean": round(statistics.fmean(whole) * 1e6, 1), "hot_us_p50": _p(whole, 0.5),
            "client_tls_us_p50": _p([c for _, c in hot], 0.5),
            "picker_us_p50": _p([s - c for s, c in hot], 0.5),
            "cold_us_p50": _p([s for s, _ in cold], 0.5), "cold_picker_us_p50": _p([s - c for s, c in cold], 0.5)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--checks", type=int, default=2000, help="hot checks per run")
    p.add_argument("--cold-checks", type=int, default=200, help="checks after a sleep, per run")
    p.add_argument("--gap-ms", type=float, default=10.0, help="sleep before each cold check")
    a = p.parse_args()
    if min(a.runs, a.checks, a.cold_checks) < 1 or not a.gap_ms >= 0:
        p.error("--runs, --checks and --cold-checks must be >= 1, --gap-ms >= 0")
    with tempfile.TemporaryDirectory(prefix="gct-") as d:
        tls_dir = Path(d)
        ensure_picker_tls(tls_dir)
        variants: dict[str, Path | None] = {"plain": None, "tls": tls_dir}
        interleaved(variants, a, lambda v, start: run(a.checks, a.cold_checks, a.gap_ms / 1000, start, v),
                    {"bench": "gateway_check_tls"})


if __name__ == "__main__":
    main()
