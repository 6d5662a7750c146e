"""What one Envoy -> picker message costs the kernel over a unix socket against TCP on the loopback.

A client and a forked echo server (plain blocking sockets, TCP_NODELAY on TCP) exchange ``--n`` round trips
of ``--size`` bytes (about one ext_proc message); the CPU (user + system, both processes, from getrusage)
and wall time per round trip are reported, medians over ``--runs`` runs per kind, the two kinds interleaved.
The Python on both sides is the same for both kinds, so the difference is the kernel's.

Run: ``.venv/bin/python bench/socket_hop.py [--n 20000] [--size 600] [--runs 5]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import tempfile
import time
from pathlib import Path


def _echo(server: socket.socket) -> None:
    conn, _ = server.accept()
    if conn.family == socket.AF_INET:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := conn.recv(65536):
        conn.sendall(data)
    os._exit(0)


def _cpu_s() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def round_trips(kind: str, n: int, size: int) -> tuple[float, float]:
    """CPU and wall microseconds per round trip over ``kind`` ("unix" or "tcp")."""
    with tempfile.TemporaryDirectory(prefix="hop-") as d:
        family = socket.AF_UNIX if kind == "unix" else socket.AF_INET
        server = socket.socket(family, socket.SOCK_STREAM)
        server.bind(str(Path(d) / "s") if kind == "unix" else ("127.0.0.1", 0))
        server.listen()
        addr = server.getsockname()
        pid = os.fork()
        if pid == 0:
            _echo(server)
        server.close()
        client = socket.socket(family, socket.SOCK_STREAM)
        client.connect(addr)
        if kind == "tcp":
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        msg = b"x" * size
        cpu0, t0 = _cpu_s(), time.perf_counter()
        for _ in range(n):
            client.sendall(msg)
            got = 0
            while got < size:
                got += len(client.recv(65536))
        wall = time.perf_counter() - t0
        client.close()
        os.waitpid(pid, 0)  # the child's CPU is counted once it is reaped
        return (_cpu_s() - cpu0) / n * 1e6, wall / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--size", type=int, default=600)
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args()
    got: dict[str, list[tuple[float, float]]] = {"unix": [], "tcp": []}
    for run in range(a.runs):
        for kind in ("unix", "tcp") if run % 2 == 0 else ("tcp", "unix"):
            got[kind].append(round_trips(kind, a.n, a.size))
    out = {f"{kind}_{what}_us_per_round_trip": round(statistics.median(r[i] for r in rows), 2)
           for kind, rows in got.items() for i, what in enumerate(("cpu", "wall"))}
    print(json.dumps({**out, "n": a.n, "size": a.size, "runs": a.runs, "load_avg_1m": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
