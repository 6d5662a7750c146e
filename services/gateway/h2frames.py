"""HTTP/2 framing for the picker's own gRPC server (``services.gateway.h2grpc``): the frame header, the frames
the server writes, and the few response header blocks it sends, HPACK-encoded by hand (RFC 7540, RFC 7541).

The server only ever sends ``:status: 200``, a gRPC content type and ``grpc-status``/``grpc-message``, so it
encodes them as literals that never touch the peer's dynamic table (no state to keep in step, no Huffman
coding); what it reads is decoded by the ``hpack`` package. Pure: bytes in, bytes out."""

from __future__ import annotations

import urllib.parse

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# error codes (RFC 7540 §7)
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x5, 0x6, 0x7, 0x8, 0x9
ENHANCE_YOUR_CALM = 0xB

# settings (RFC 7540 §6.5.2)
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

DEFAULT_WINDOW = 65_535
DEFAULT_FRAME = 16_384
MAX_WINDOW = 2**31 - 1
MAX_FRAME_LIMIT = 2**24 - 1

# gRPC status codes the server itself answers with
GRPC_OK, GRPC_INVALID_ARGUMENT, GRPC_RESOURCE_EXHAUSTED, GRPC_UNIMPLEMENTED, GRPC_INTERNAL = 0, 3, 8, 12, 13


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One frame: its 9-byte header, then ``payload`` (at most the peer's frame size: the caller splits)."""
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload


def settings(pairs: dict[int, int]) -> bytes:
    """A SETTINGS frame carrying ``pairs`` (identifier → value)."""
    return frame(SETTINGS, 0, 0, b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in pairs.items()))


def window_update(stream: int, increment: int) -> bytes:
    """A WINDOW_UPDATE frame granting ``increment`` more bytes on ``stream`` (0: the connection)."""
    return frame(WINDOW_UPDATE, 0, stream, increment.to_bytes(4, "big"))


def rst_stream(stream: int, code: int) -> bytes:
    """A RST_STREAM frame ending ``stream`` with ``code``."""
    return frame(RST_STREAM, 0, stream, code.to_bytes(4, "big"))


def goaway(last_stream: int, code: int, debug: bytes = b"") -> bytes:
    """A GOAWAY frame: streams above ``last_stream`` were not and will not be processed (the peer may send them
    again elsewhere)."""
    return frame(GOAWAY, 0, 0, last_stream.to_bytes(4, "big") + code.to_bytes(4, "big") + debug)


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer with a ``prefix_bits``-bit prefix, its first byte's high bits ``first`` (RFC 7541 §5.1)."""
    top = (1 << prefix_bits) - 1
    if value < top:
        return bytes((first | value,))
    out = bytearray((first | top,))
    value -= top
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(raw: bytes) -> bytes:
    """An HPACK string literal, not Huffman-coded."""
    return _integer(len(raw), 7, 0) + raw


def _literal(name_index: int, value: bytes) -> bytes:
    """A header field without indexing, its name from the static table (RFC 7541 §6.2.2)."""
    return _integer(name_index, 4, 0) + _string(value)


def _literal_new(name: bytes, value: bytes) -> bytes:
    """A header field without indexing, its name given literally."""
    return b"\x00" + _string(name) + _string(value)


STATUS_200 = b"\x88"  # static table entry 8, indexed
CONTENT_TYPE = 31  # static table index of the name content-type
RESPONSE_HEADERS = STATUS_200 + _literal(CONTENT_TYPE, b"application/grpc")
"""The response's header block: the same bytes every time (nothing goes into any table)."""


def grpc_message(text: str) -> bytes:
    """``grpc-message``'s value: percent-encoded as gRPC's HTTP/2 mapping asks (printable ASCII but ``%``
    kept)."""
    return urllib.parse.quote(text[:512], safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~", encoding="utf-8").encode()


def trailers(status: int, message: str = "", only: bool = False) -> bytes:
    """The trailer block ending a call with ``status``; with ``only`` the whole response in one block (a call
    refused before any message: HTTP/2 status and content type too)."""
    block = _literal_new(b"grpc-status", str(status).encode())
    if message:
        block += _literal_new(b"grpc-message", grpc_message(message))
    return RESPONSE_HEADERS + block if only else block


def message(payload: bytes) -> bytes:
    """A gRPC length-prefixed message, uncompressed."""
    return b"\x00" + len(payload).to_bytes(4, "big") + payload
