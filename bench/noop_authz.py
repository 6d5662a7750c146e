"""A do-nothing HTTP authorization server: a floor path of ``bench/gateway.py --floor``.

Envoy's ``ext_authz`` filter (``http_service``, ``with_request_body``) sends each request's headers and
buffered body here as one HTTP/1.1 request over a kept-alive connection, and forwards the client's request
upstream with the headers this server's 200 answer carries (``allowed_upstream_headers``). This server
answers every request at once with ``200`` and ``x-gateway-destination-endpoint: <destination>``, the header
the engines cluster's ``override_host`` policy reads. No framework: an ``asyncio.Protocol`` on uvloop that
parses just enough HTTP/1.1 (head, ``content-length`` body). It measures what one Envoy → Python hop over
plain HTTP/1.1 costs, against the gRPC ``ext_proc`` exchange of ``bench/noop_ext_proc.py``.

A bench tool, not a product part. Run: ``python bench/noop_authz.py --port P --destination HOST:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable
from typing import cast


def answer(destination: str) -> bytes:
    """The one response, encoded once: an allowed request with its destination."""
    return (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nx-gateway-destination-endpoint: %s\r\n\r\n"
            % destination.encode())


def content_length(head: bytes) -> int:
    """The ``content-length`` of a request head (0 when absent, -1 when it is not a non-negative integer)."""
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            value = line[15:].strip()
            return int(value) if value.isdigit() and len(value) <= 12 else -1
    return 0


Answer = Callable[[bytes, bytes], "bytes | Awaitable[bytes]"]
"""Request head and body -> the whole HTTP response (at once, or when awaited)."""


class OneByOne(asyncio.Protocol):
    """One connection from Envoy: requests in, answers out in order. Envoy's HTTP/1.1 pool never pipelines,
    so a request's answer is written before the next request arrives."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            length = content_length(self.buf[:end])
            if length < 0:  # a malformed head: nothing after it can be framed, so the connection goes
                self.buf = b""
                if self.transport is not None:
                    self.transport.close()
                return
            need = end + 4 + length
            if len(self.buf) < need:
                return  # the body is still coming
            head, body, self.buf = self.buf[:end], self.buf[end + 4:need], self.buf[need:]
            out = self.answer(head, body)
            if isinstance(out, bytes):
                self._write(out)
            else:
                asyncio.ensure_future(out).add_done_callback(lambda f: self._write(f.result()))

    def _write(self, out: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)


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
