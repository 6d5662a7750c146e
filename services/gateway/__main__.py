"""``python -m services.gateway``: run one Gantry endpoint picker (Envoy ext_proc or ext_authz server)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import uvloop

from services.gateway.protocol import (
    DEFAULT_SOCKET_DIR,
    GRPC_SOCKET,
    HTTP_SOCKET,
    PICKER_IDLE_TIMEOUT_S,
    PICKER_MAX_CONNECTIONS,
    PickerTransport,
    idle_timeout_error,
    max_connections_error,
)
from services.gateway.service import Gateway, GatewayOptions
from services.gateway.tls import CA_FILE, PICKER_CERT, PICKER_KEY, TlsError, load_picker_tls
from shared.core.routing import builtin_names
from shared.core.routing.pool_source import PoolSource
from shared.envsettings import credentials_on_command_line, redis_url_problem
from shared.host.placement_follow import add_pool_arguments
from shared.host.report_auth import MASTER_KEY_ENV, master_key_text, parse_key
from shared.host.tasks import run_until_signalled
from shared.settings import load_settings_or_exit


def parse_args(argv: list[str] | None = None) -> GatewayOptions:
    """Options from the command line."""
    p = argparse.ArgumentParser(prog="python -m services.gateway", description=__doc__)
    p.add_argument("--nats-url", default=None,
                   help="default: the GANTRY_* settings' (GANTRY_NATS_URL, with GANTRY_IDENTITY's secret from the "
                        "credentials file: how a stack and compose pass it, out of ps)")
    add_pool_arguments(p)
    p.add_argument("--eds-path", required=True, type=Path, help="Envoy endpoint file to maintain")
    p.add_argument("--socket-dir", type=Path, default=None,
                   help=f"listen on unix sockets here ({GRPC_SOCKET}: gRPC, {HTTP_SOCKET}: ext_authz HTTP), in a "
                        f"directory only this user may enter (default: {DEFAULT_SOCKET_DIR}; the default "
                        "transport, for Envoy on the same host)")
    p.add_argument("--grpc-host", default="127.0.0.1", help="TCP listeners' address")
    p.add_argument("--grpc-port", type=int, default=None,
                   help="listen on TCP instead of unix sockets (Envoy in another container: docs/security.md); "
                        "gRPC on this port")
    p.add_argument("--tls-dir", type=Path, default=None,
                   help=f"TCP only: mutual TLS on both listeners, only clients with a certificate from this "
                        f"directory's {CA_FILE} connect (Envoy's); it holds {CA_FILE}, {PICKER_CERT} and {PICKER_KEY} "
                        "(`python -m ops.tls picker DIR` generates them with Envoy's; docs/security.md)")
    p.add_argument("--profile", default="default", choices=builtin_names())
    p.add_argument("--expire-s", type=float, default=3.0, help="drop an endpoint silent this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--staleness-s", type=float, default=None,
                   help="engine reports older than this count as stale (default: the profile's, 0.2 s)")
    p.add_argument("--capture", type=Path, default=None,
                   help="append every routed request to this JSONL trace (Mooncake-style; `gantry simulate` "
                        "replays it)")
    p.add_argument("--capture-salt", default="", help="key of the trace's prefix-block hashes")
    p.add_argument("--transport", type=PickerTransport, choices=list(PickerTransport), default=PickerTransport.EXT_PROC,
                   help="how Envoy asks: ext_proc gRPC streams (GIE protocol), or one HTTP/1.1 ext_authz check per "
                        "request on --http-port with request ends from Envoy's gRPC access log on --grpc-port")
    p.add_argument("--http-port", type=int, default=None,
                   help="listen on TCP instead of unix sockets; ext_authz checks, /health and /v1/models on this port")
    p.add_argument("--feed-window-ms", type=float, default=-1.0,
                   help="take the engines' reports in a child process and apply them in batches this long "
                        "(less CPU on the deciding loop, more in all; a report reaches the core up to this much "
                        "later); negative (the default): subscribe on the deciding loop")
    p.add_argument("--idle-timeout-s", type=float, default=PICKER_IDLE_TIMEOUT_S,
                   help="close a connection to the picker idle this long (Envoy closes its own after half of it "
                        "when ops.envoy is given the same --picker-idle-timeout-s; if not, Envoy retries what the "
                        "close cuts)")
    p.add_argument("--max-connections", type=int, default=PICKER_MAX_CONNECTIONS,
                   help="connections kept open per listener; past it a new one is closed at once")
    a = p.parse_args(argv)
    for why in (idle_timeout_error("--idle-timeout-s", a.idle_timeout_s),
                max_connections_error("--max-connections", a.max_connections)):
        if why is not None:
            p.error(why)
    urls = (("--nats-url", a.nats_url, "GANTRY_NATS_URL"), ("--redis-url", a.redis_url, "GANTRY_REDIS_URL"))
    for flag, url, env in urls:
        if refused := credentials_on_command_line(flag, url, env):
            sys.exit(f"{p.prog}: error: {refused}")
    if a.redis_url and (problem := redis_url_problem(a.redis_url)):
        p.error(f"--redis-url: {problem}")
    settings = load_settings_or_exit(p.prog)  # GANTRY_*: the URLs when not given, the CA when NATS speaks TLS
    a.nats_url = a.nats_url or settings.nats_url
    if a.pool_source is PoolSource.PLACEMENT:
        a.redis_url = a.redis_url or settings.redis_url
    try:  # through the environment or the credentials file only: a command line is readable by every local user
        master = master_key_text(os.environ, settings.credentials_file)
        report_master = parse_key(master, f"${MASTER_KEY_ENV}") if master else None
    except ValueError as err:
        p.error(str(err))
    if a.transport is PickerTransport.EXT_AUTHZ and a.capture is not None:
        p.error("--capture needs --transport ext_proc (the output length is read from the response body)")
    if a.socket_dir is not None and (a.grpc_port is not None or a.http_port is not None):
        p.error("--socket-dir (unix sockets) and --grpc-port/--http-port (TCP) exclude each other")
    tls = None
    if a.tls_dir is not None:
        if a.grpc_port is None and a.http_port is None:  # unix sockets: their file modes already admit only us
            sys.exit(f"{p.prog}: error: --tls-dir needs --grpc-port/--http-port (unix sockets need no TLS: only "
                     "their user can open them)")
        try:
            tls = load_picker_tls(a.tls_dir)
        except TlsError as err:
            sys.exit(f"{p.prog}: error: {err}")
    return GatewayOptions(nats_url=a.nats_url, eds_path=a.eds_path, grpc_host=a.grpc_host, grpc_port=a.grpc_port,
                          profile=a.profile, expire_s=a.expire_s, seed=a.seed, staleness_s=a.staleness_s,
                          capture=a.capture, capture_salt=a.capture_salt, transport=a.transport,
                          http_port=a.http_port, socket_dir=a.socket_dir,
                          feed_window_s=a.feed_window_ms / 1000 if a.feed_window_ms >= 0 else None,
                          pool_source=a.pool_source, redis_url=a.redis_url, tls_ca_file=settings.tls_ca_file,
                          report_master=report_master, metrics_port=settings.metrics_port,
                          metrics_host=settings.metrics_host,
                          idle_timeout_s=a.idle_timeout_s, max_connections=a.max_connections, tls=tls)


def main(argv: list[str] | None = None) -> None:
    """Parse options and serve until SIGTERM/SIGINT."""
    opts = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if opts.expire_s <= 0:
        print("error: --expire-s must be > 0", file=sys.stderr)
        sys.exit(2)
    if opts.staleness_s is not None and not opts.staleness_s > 0:
        print("error: --staleness-s must be > 0", file=sys.stderr)
        sys.exit(2)
    # on uvloop, as the other services: 10-13% less picker CPU per pick than asyncio's own loop (bench/gateway.py
    # picks driver, A/B in one window)
    try:
        gateway = Gateway(opts)
    except (OSError, ValueError) as err:  # e.g. a --capture file that is not a capture, or cannot be opened
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    uvloop.run(run_until_signalled(gateway.run()))


if __name__ == "__main__":
    main()
