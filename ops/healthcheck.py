"""Container health check: ``python -m ops.healthcheck SERVICE [--listening SOCKET]``.

Healthy means the container's main process (pid 1) is the named service, both servers it depends
on answer from inside the container with the container's own ``GANTRY_*`` settings, and (``--listening``)
the service accepts connections on its unix socket (the picker: Envoy, waiting on it, must not start
before it listens). Exit 0 when healthy, 1 with a one-line reason otherwise (docker shows it in
``docker inspect``).
"""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

from shared.settings import Settings


def main_process_runs(service: str, proc: Path = Path("/proc/1/cmdline")) -> bool:
    """True if pid 1's command line runs ``services.<service>``."""
    try:
        argv = proc.read_bytes().split(b"\0")
    except OSError:
        return False
    return f"services.{service}".encode() in argv


async def servers_answer(settings: Settings, timeout: float = 3.0) -> str | None:
    """None when NATS and Redis both answer, else why not."""
    import nats
    import redis.asyncio as aioredis

    from shared.bus.runtime import nats_options

    async def quiet(_: Exception) -> None:
        return None

    try:
        nc = await asyncio.wait_for(
            nats.connect(
                settings.nats_url, allow_reconnect=False, connect_timeout=int(timeout), error_cb=quiet,
                **nats_options(settings),
            ),
            timeout,
        )
        await nc.close()
    except Exception as err:
        return f"NATS unreachable: {err or type(err).__name__}"
    client = aioredis.from_url(settings.redis_url, socket_connect_timeout=timeout)
    try:
        await client.ping()
    except Exception as err:
        return f"Redis unreachable: {err}"
    finally:
        await client.aclose()
    return None


def accepts(path: Path, timeout: float = 2.0) -> str | None:
    """None when a server accepts connections on the unix socket ``path``, else why not."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as err:
            return f"nothing listens on {path}: {err}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Check one service; returns the process exit code."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 3) or (len(args) == 3 and args[1] != "--listening"):
        print("usage: python -m ops.healthcheck SERVICE [--listening SOCKET]", file=sys.stderr)
        return 2
    service = args[0]
    if len(args) == 3 and (problem := accepts(Path(args[2]))):
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    if not main_process_runs(service):
        print(f"unhealthy: the main process is not services.{service}", file=sys.stderr)
        return 1
    problem = asyncio.run(servers_answer(Settings()))
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
