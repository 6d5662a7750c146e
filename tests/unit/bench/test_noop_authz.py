"""The bench's do-nothing ext_authz server (``bench/gateway.py --floor``): every check Envoy sends over a
kept-alive HTTP/1.1 connection is answered, in order, with the destination header Envoy routes on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from bench.noop_authz import Answer, OneByOne, answer, content_length


@asynccontextmanager
async def connected(reply: Answer) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A live server answering with ``reply``, and one client connection to it."""
    server = await asyncio.get_running_loop().create_server(lambda: OneByOne(reply), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            yield reader, writer
        finally:
            writer.close()


def test_the_answer_allows_the_request_and_names_its_destination() -> None:
    assert answer("127.0.0.1:8001") == (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n"
                                        b"x-gateway-destination-endpoint: 127.0.0.1:8001\r\n\r\n")


def test_content_length_is_read_case_insensitively_and_absent_means_no_body() -> None:
    assert content_length(b"POST /x HTTP/1.1\r\nContent-Length: 12") == 12
    assert content_length(b"GET /health HTTP/1.1\r\nhost: a") == 0


def test_a_negative_huge_or_garbled_content_length_is_malformed() -> None:
    for value in (b"-5", b"12abc", b"", b"9" * 40):
        assert content_length(b"POST /x HTTP/1.1\r\ncontent-length: " + value) == -1


async def test_a_malformed_head_closes_the_connection_without_an_answer() -> None:
    seen: list[bytes] = []

    def reply(head: bytes, body: bytes) -> bytes:
        seen.append(body)
        return b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"

    async with connected(reply) as (reader, writer):
        writer.write(b"POST /a HTTP/1.1\r\ncontent-length: -3\r\n\r\nabc")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(1024), 5) == b""  # closed, nothing answered
    assert seen == []


async def test_requests_on_one_connection_are_answered_in_order_even_when_split_across_reads() -> None:
    seen: list[bytes] = []

    def reply(head: bytes, body: bytes) -> bytes:
        seen.append(body)
        return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)

    async with connected(reply) as (reader, writer):
        first = b"POST /a HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello"
        second = b"POST /b HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc"
        writer.write(first[:20])  # the head arrives in pieces, then the rest with the next request
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(first[20:] + second)
        got = b""
        while got.count(b"\r\n\r\n") < 2 or not got.endswith(b"abc"):
            got += await asyncio.wait_for(reader.read(1024), 5)
    assert seen == [b"hello", b"abc"]
    assert got.index(b"hello") < got.index(b"abc")


async def test_an_awaited_answer_is_written_when_it_is_ready() -> None:
    async def later(_head: bytes, _body: bytes) -> bytes:
        await asyncio.sleep(0.01)
        return b"HTTP/1.1 204 No Content\r\n\r\n"

    async with connected(later) as (reader, writer):
        writer.write(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 204")
