"""``python -m services.picker``: run one Gantry endpoint picker answering pick requests on NATS."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from services.picker.service import PickerOptions, PickerService
from shared.core.routing import builtin_names
from shared.core.routing.pool_source import PoolSource
from shared.envsettings import credentials_on_command_line, redis_url_problem
from shared.host.placement_follow import add_pool_arguments
from shared.host.report_auth import MASTER_KEY_ENV, master_key_text, parse_key
from shared.host.tasks import run_until_signalled
from shared.settings import load_settings_or_exit

NATS_URL_ENV = "GANTRY_NATS_URL"


def parse_args(argv: list[str] | None = None) -> PickerOptions:
    """Options from the command line."""
    p = argparse.ArgumentParser(prog="python -m services.picker", description=__doc__)
    p.add_argument("--nats-url", default=None,
                   help=f"default: ${NATS_URL_ENV} (a URL with credentials goes there, out of ps)")
    p.add_argument("--profile", default="default", choices=builtin_names())
    p.add_argument("--expire-s", type=float, default=3.0, help="drop an endpoint silent this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flight-ttl-s", type=float, default=1800.0,
                   help="a picked request whose end was never reported stops counting as in flight after this long")
    p.add_argument("--max-in-flight", type=int, default=100_000,
                   help="requests counted in flight at most (past it the oldest stop counting)")
    add_pool_arguments(p)
    a = p.parse_args(argv)
    for flag, url, env in (("--nats-url", a.nats_url, NATS_URL_ENV), ("--redis-url", a.redis_url, "GANTRY_REDIS_URL")):
        if refused := credentials_on_command_line(flag, url, env):
            sys.exit(f"{p.prog}: error: {refused}")
    if a.redis_url and (problem := redis_url_problem(a.redis_url)):
        p.error(f"--redis-url: {problem}")
    a.nats_url = a.nats_url or os.environ.get(NATS_URL_ENV)
    if not a.nats_url:
        p.error(f"--nats-url or ${NATS_URL_ENV} is required")
    if not a.expire_s > 0:
        p.error("--expire-s must be > 0")
    if not a.flight_ttl_s > 0:
        p.error("--flight-ttl-s must be > 0")
    if a.max_in_flight < 1:
        p.error("--max-in-flight must be >= 1")
    settings = load_settings_or_exit(p.prog)  # GANTRY_*, as every service reads them (metrics port, credentials file)
    if a.pool_source is PoolSource.PLACEMENT:
        a.redis_url = a.redis_url or settings.redis_url
    try:  # the environment, else the credentials file GANTRY_CREDENTIALS_FILE names (never the command line)
        master = master_key_text(os.environ, settings.credentials_file)
        report_master = parse_key(master, f"${MASTER_KEY_ENV}") if master else None
    except ValueError as err:
        p.error(str(err))
    return PickerOptions(nats_url=a.nats_url, profile=a.profile, expire_s=a.expire_s, seed=a.seed,
                         flight_ttl_s=a.flight_ttl_s, max_in_flight=a.max_in_flight, report_master=report_master,
                         metrics_port=settings.metrics_port, metrics_host=settings.metrics_host,
                         pool_source=a.pool_source, redis_url=a.redis_url)


def main(argv: list[str] | None = None) -> None:
    """Parse options and serve until SIGTERM/SIGINT."""
    opts = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio works too
        asyncio.run(run_until_signalled(PickerService(opts).run()))
    else:
        uvloop.run(run_until_signalled(PickerService(opts).run()))


if __name__ == "__main__":
    main()
