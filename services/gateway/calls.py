"""The picker's gRPC methods, as its own HTTP/2 server (``h2grpc``) calls them: each servicer's messages parsed
on the way in and serialized on the way out. The servicers stay grpcio-shaped (their tests drive them either
way); only the transport under them is the picker's own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from envoy.service.accesslog.v3 import als_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.message import DecodeError

from services.gateway.authz import AccessLogSink
from services.gateway.epp import Picker
from services.gateway.h2frames import GRPC_INVALID_ARGUMENT
from services.gateway.h2stream import CallError, Handler

PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
ACCESS_LOG = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"
SERVING = b"\x08\x01"  # grpc.health.v1.HealthCheckResponse{status: SERVING}, encoded by hand (one varint)

M = TypeVar("M")


async def parsed(raw: AsyncIterator[bytes], parse: Callable[[bytes], M]) -> AsyncIterator[M]:
    """``raw`` messages parsed; one that does not parse ends the call with INVALID_ARGUMENT."""
    async for data in raw:
        try:
            msg = parse(data)
        except DecodeError as err:
            raise CallError(GRPC_INVALID_ARGUMENT, f"message does not parse: {err}") from None
        yield msg


def process_call(picker: Picker) -> Handler:
    """ext_proc's ``Process``: one HTTP request's exchange with the picker."""
    parse = pb.ProcessingRequest.FromString

    async def call(raw: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for resp in picker.Process(parsed(raw, parse), None):
            yield resp.SerializeToString()

    return call


async def health_call(raw: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``grpc.health.v1.Health/Check`` answered SERVING from the picker's own event loop, so Envoy's active health
    check fails when the loop stalls as well as when the process is gone."""
    async for _ in raw:  # unary: the one request (any service name), then the end of the peer's side
        pass
    yield SERVING


def access_log_call(sink: AccessLogSink) -> Handler:
    """Envoy's access-log stream (ext_authz transport): entries in, one empty answer when Envoy ends it."""
    parse = als_pb2.StreamAccessLogsMessage.FromString

    async def call(raw: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        resp = await sink.StreamAccessLogs(parsed(raw, parse), None)
        yield resp.SerializeToString()

    return call


def picker_methods(picker: Picker, sink: AccessLogSink | None) -> dict[str, Handler]:
    """The picker's gRPC listener's methods: ext_proc and the health check, and the access log when ``sink``."""
    methods = {PROCESS: process_call(picker), HEALTH_CHECK: health_call}
    if sink is not None:
        methods[ACCESS_LOG] = access_log_call(sink)
    return methods
