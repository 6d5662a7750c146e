"""A do-nothing ext_proc server: the floor under Gantry's picker in ``bench/gateway.py --floor``.

It speaks the same exchange as the picker (``services.gateway.protocol``: request headers, buffered body,
response headers) and answers each message at once with the mutation the picker would send, but for a
fixed endpoint and with no parsing, tokenizing or routing. Envoy then sends the request to the same engine
server by the same path (``override_host`` reading ``envoy.lb/x-gateway-destination-endpoint``), so the
latency it adds over a direct call is what Envoy plus a Python grpcio asyncio ext_proc server on uvloop cost
before Gantry decides anything. It also answers gRPC health checks, as Envoy's cluster for the picker asks.

A bench tool, not a product part. Run: ``python bench/noop_ext_proc.py --port P --destination HOST:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from bench/gateway.py
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb  # noqa: E402
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc  # noqa: E402
from google.protobuf import struct_pb2  # noqa: E402

from services.gateway.calls import HEALTH_CHECK, PROCESS, SERVING, health_call  # noqa: E402
from services.gateway.epp import DESTINATION, METADATA_NS, PICKED, _set_header  # noqa: E402
from services.gateway.h2grpc import H2Connection  # noqa: E402
from services.gateway.h2stream import Handler  # noqa: E402
from services.gateway.http1 import Connections  # noqa: E402

HEALTH_SERVICE = "grpc.health.v1.Health"


class NoopAnswers:
    """The answer to each ext_proc message, built once: the stream's work is only to look up and send."""

    def __init__(self, destination: str, endpoint_id: str) -> None:
        meta = struct_pb2.Struct()
        meta.fields[METADATA_NS].struct_value.fields[DESTINATION].string_value = destination
        # the shape of the picker's decision (Picker.decide): header and dynamic metadata, on the body's answer
        self.body = pb.ProcessingResponse(
            request_body=pb.BodyResponse(response=pb.CommonResponse(
                header_mutation=pb.HeaderMutation(set_headers=[_set_header(DESTINATION, destination)]),
                clear_route_cache=False)),
            dynamic_metadata=meta)
        # the picker names its list on the response (PICKED); a one-entry list here
        self.response_headers = pb.ProcessingResponse(response_headers=pb.HeadersResponse(
            response=pb.CommonResponse(header_mutation=pb.HeaderMutation(
                set_headers=[_set_header(PICKED, endpoint_id)]))))
        self.by_kind: dict[str, pb.ProcessingResponse] = {
            "request_headers": pb.ProcessingResponse(request_headers=pb.HeadersResponse()),
            "request_body": self.body,
            "response_headers": self.response_headers,
            # never asked for (no mode override is sent), acknowledged should Envoy send them anyway
            "response_body": pb.ProcessingResponse(response_body=pb.BodyResponse()),
            "request_trailers": pb.ProcessingResponse(request_trailers=pb.TrailersResponse()),
            "response_trailers": pb.ProcessingResponse(response_trailers=pb.TrailersResponse()),
        }

    def answer(self, msg: pb.ProcessingRequest) -> pb.ProcessingResponse:
        """The response to one message: same oneof kind as the message (Envoy rejects any other)."""
        kind = msg.WhichOneof("request")
        if kind is None or kind not in self.by_kind:
            raise ValueError(f"unexpected ext_proc message {kind!r}")
        return self.by_kind[kind]


class NoopProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]  # generated, untyped
    """ext_proc servicer answering every message of a stream with ``NoopAnswers``."""

    def __init__(self, answers: NoopAnswers) -> None:
        self.answers = answers

    async def Process(self, request_iterator: AsyncIterator[pb.ProcessingRequest],  # gRPC's method name
                      context: grpc.aio.ServicerContext) -> AsyncGenerator[pb.ProcessingResponse, None]:
        """One HTTP request's stream; it ends when Envoy closes its side (the HTTP request ended)."""
        async for msg in request_iterator:
            yield self.answers.answer(msg)


class NoopReadWrite(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]  # generated, untyped
    """The same answers through ``context.read()``/``context.write()`` instead of async iterators (grpc-aio's
    other streaming API: no async generator wrapped around the handler)."""

    def __init__(self, answers: NoopAnswers) -> None:
        self.answers = answers

    async def Process(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:
        """One stream, read and answered message by message until Envoy closes its side."""
        while (msg := await context.read()) is not grpc.aio.EOF:
            await context.write(self.answers.answer(msg))


class NoopSync(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]  # generated, untyped
    """The same answers on grpcio's synchronous server (a thread per stream from its pool)."""

    def __init__(self, answers: NoopAnswers) -> None:
        self.answers = answers

    def Process(self, request_iterator: Iterator[pb.ProcessingRequest],  # gRPC's method name
                context: grpc.ServicerContext) -> Iterator[pb.ProcessingResponse]:
        """One stream on a pool thread."""
        for msg in request_iterator:
            yield self.answers.answer(msg)


def health_handler() -> grpc.GenericRpcHandler:
    """``grpc.health.v1.Health/Check`` answered SERVING on grpc.aio's event loop."""

    async def check(_request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
        return SERVING

    return grpc.method_handlers_generic_handler(HEALTH_SERVICE, {"Check": grpc.unary_unary_rpc_method_handler(
        check, request_deserializer=bytes, response_serializer=bytes)})


def sync_health_handler() -> grpc.GenericRpcHandler:
    """``grpc.health.v1.Health/Check`` answered SERVING on a pool thread (the sync server's health check)."""
    return grpc.method_handlers_generic_handler(HEALTH_SERVICE, {"Check": grpc.unary_unary_rpc_method_handler(
        lambda _req, _ctx: SERVING, request_deserializer=bytes, response_serializer=bytes)})


TUNED_OPTIONS = (  # server channel arguments that drop per-connection/per-stream work Envoy's one connection needs not
    ("grpc.http2.bdp_probe", 0),  # no bandwidth-delay pings on every data frame burst
    ("grpc.enable_channelz", 0),  # no per-call channelz accounting
    ("grpc.so_reuseport", 0),
    ("grpc.max_concurrent_streams", 1000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.optimization_target", "latency"),
    ("grpc.default_compression_algorithm", 0),  # none (the default, stated)
)

STYLES = ("aio", "rw", "sync", "tuned", "h2")


def serve_sync(port: int, destination: str, endpoint_id: str, host: str = "127.0.0.1", workers: int = 64) -> None:
    """The sync variant: grpc.server with a thread pool, until killed."""
    server = grpc.server(ThreadPoolExecutor(max_workers=workers), maximum_concurrent_rpcs=workers - 4)
    pb_grpc.add_ExternalProcessorServicer_to_server(NoopSync(NoopAnswers(destination, endpoint_id)), server)
    server.add_generic_rpc_handlers((sync_health_handler(),))
    server.add_insecure_port(f"{host}:{port}")
    server.start()
    server.wait_for_termination()


async def serve_h2(port: int, destination: str, endpoint_id: str, host: str = "127.0.0.1") -> None:
    """The same answers on the picker's own HTTP/2 server (``services.gateway.h2grpc``), until cancelled."""
    answers = NoopAnswers(destination, endpoint_id)
    parse = pb.ProcessingRequest.FromString

    async def process(raw: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for data in raw:
            yield answers.answer(parse(data)).SerializeToString()

    methods: dict[str, Handler] = {PROCESS: process, HEALTH_CHECK: health_call}
    conns = Connections(3600.0, 1024)
    server = await asyncio.get_running_loop().create_server(lambda: H2Connection(methods, conns, 1 << 24), host,
                                                            port)
    try:
        await asyncio.get_running_loop().create_future()
    finally:
        server.close()


async def serve(port: int, destination: str, endpoint_id: str, host: str = "127.0.0.1", style: str = "aio") -> None:
    """Serve until cancelled or killed."""
    if style == "h2":
        await serve_h2(port, destination, endpoint_id, host)
        return
    server = grpc.aio.server(options=TUNED_OPTIONS if style == "tuned" else None)
    answers = NoopAnswers(destination, endpoint_id)
    servicer = NoopReadWrite(answers) if style == "rw" else NoopProcessor(answers)
    pb_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((health_handler(),))
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    try:
        await server.wait_for_termination()
    finally:
        await server.stop(1.0)


def main(argv: list[str] | None = None) -> None:
    """Parse options and serve on uvloop (as the picker does: same event loop, comparable CPU)."""
    import uvloop

    p = argparse.ArgumentParser(description="do-nothing ext_proc server (bench floor)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--destination", required=True, help="host:port every request is sent to")
    p.add_argument("--endpoint-id", default="noop", help="named in the response header the picker sets")
    p.add_argument("--style", choices=STYLES, default="aio",
                   help="aio: grpc.aio with async iterators (as the picker); rw: grpc.aio with context.read/write; "
                        "sync: grpc.server on a thread pool; tuned: aio with TUNED_OPTIONS; h2: the picker's own "
                        "HTTP/2 server")
    a = p.parse_args(argv)
    if a.style == "sync":
        serve_sync(a.port, a.destination, a.endpoint_id)
        return
    uvloop.run(serve(a.port, a.destination, a.endpoint_id, style=a.style))


if __name__ == "__main__":
    main()
