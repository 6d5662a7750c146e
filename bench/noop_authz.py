"""A do-nothing HTTP authorization server: a floor path of ``bench/gateway.py --floor``.

Envoy's ``ext_authz`` filter (``http_service``, ``with_request_body``) sends each request's headers and
buffered body here as one HTTP/1.1 request over a kept-alive connection, and forwards the client's request
upstream with the headers this server's 200 answer carries (``allowed_upstream_headers``). This server
answers every request at once with ``200`` and ``x-gateway-destination-endpoint: <destination>``, the header
the engines cluster's ``override_host`` policy reads. No framework: an ``asyncio.Protocol`` on uvloop that
parses just enough HTTP/1.1 (the product's framing, ``services.gateway.http1``). It measures what one
Envoy → Python hop over plain HTTP/1.1 costs, against the gRPC ``ext_proc`` exchange of ``bench/noop_ext_proc.py``.

A bench tool, not a product part. Run: ``python bench/noop_authz.py --port P --destination HOST:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from bench/gateway.py
    sys.path.insert(0, str(REPO))

from services.gateway.http1 import OneByOne  # noqa: E402


def answer(destination: str) -> bytes:
    """The one response, encoded once: an allowed request with its destination."""
    return (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nx-gateway-destination-endpoint: %s\r\n\r\n"
            % destination.encode())


async def serve(port: int, destination: str, host: str = "127.0.0.1") -> None:
    """Serve until cancelled or killed."""
    reply = answer(destination)
    server = await asyncio.get_running_loop().create_server(lambda: OneByOne(lambda _h, _b: reply), host, port)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    """Parse options and serve on uvloop (as the picker does)."""
    import uvloop

    p = argparse.ArgumentParser(description="do-nothing ext_authz HTTP server (bench floor)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--destination", required=True, help="host:port every request is sent to")
    a = p.parse_args(argv)
    uvloop.run(serve(a.port, a.destination))


if __name__ == "__main__":
    main()
