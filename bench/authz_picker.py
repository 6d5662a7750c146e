"""Gantry's picker deciding over Envoy's ext_authz HTTP hop: a floor path of ``bench/gateway.py --floor``.

What the gateway would add if the picker's request path were one plain HTTP/1.1 ``ext_authz`` check
instead of the gRPC ``ext_proc`` exchange, with the real decision on it: a whole picker replica
(``services.gateway.service.Gateway``: NATS-fed routing core, EDS file, tokenizer) whose ``Picker.decide``
answers each check. A decision becomes ``200`` with ``x-gateway-destination-endpoint`` (the list Envoy's
``override_host`` policy walks), a refusal becomes its status and JSON body. Nothing reports the end of a
request on this path, so the request is marked finished as soon as its answer is written: the in-flight
books then hold nothing (fine at this bench's 1-token answers, not a product behaviour). Its gRPC
``ext_proc`` server also runs (unused here).

A bench tool, not a product part. Run: ``python bench/authz_picker.py --port P --nats-url U --eds-path F
--grpc-port G``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from bench/gateway.py
    sys.path.insert(0, str(REPO))

from bench.noop_authz import OneByOne  # noqa: E402
from ops.envoy import HEALTH_PATH  # noqa: E402
from services.gateway.epp import DESTINATION, Picker  # noqa: E402
from services.gateway.service import Gateway, GatewayOptions  # noqa: E402

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


def headers_of(head: bytes) -> dict[str, str]:
    """Lower-cased request headers plus ``:method`` and ``:path``, as the picker reads them."""
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    out = {":method": method, ":path": path}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        out[key.strip().lower()] = value.strip()
    return out


async def check(picker: Picker, head: bytes, body: bytes) -> bytes:
    """One ext_authz check answered by the picker (and Envoy's health check of the picker cluster)."""
    if head.startswith(b"GET %s " % HEALTH_PATH.encode()):
        return OK
    resp, decision = await picker.decide(body, headers_of(head))
    if decision is None:
        imm = resp.immediate_response
        return (b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                % (imm.status.code, len(imm.body), imm.body))
    value = resp.request_body.response.header_mutation.set_headers[0].header.raw_value
    picker.router.flush()
    picker.router.finished(decision.request_id)  # see the module docstring
    return b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n%s: %s\r\n\r\n" % (DESTINATION.encode(), value)


async def serve(port: int, opts: GatewayOptions) -> None:
    """The picker replica and its ext_authz HTTP server, until cancelled."""
    gw = Gateway(opts)
    ready = asyncio.Event()
    replica = asyncio.create_task(gw.run(ready))
    await ready.wait()
    server = await asyncio.get_running_loop().create_server(
        lambda: OneByOne(lambda h, b: check(gw.picker, h, b)), opts.grpc_host, port)
    async with server:
        await asyncio.gather(server.serve_forever(), replica)


def main(argv: list[str] | None = None) -> None:
    """Parse options and serve on uvloop (as the picker does)."""
    import uvloop

    p = argparse.ArgumentParser(description="Gantry's picker behind Envoy's ext_authz (bench floor)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--nats-url", required=True)
    p.add_argument("--eds-path", type=Path, required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    a = p.parse_args(argv)
    uvloop.run(serve(a.port, GatewayOptions(nats_url=a.nats_url, eds_path=a.eds_path, grpc_port=a.grpc_port)))


if __name__ == "__main__":
    main()
