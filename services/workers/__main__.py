"""``python -m services.workers``: run a fleet of emulated GPU workers."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import signal
import sys

import uvloop

from services.workers.emulator import FleetConfig, fleet_problem, run_fleet
from shared.bus.runtime import nats_options
from shared.core.limits import MAX_EMULATED_WORKERS, MAX_GPUS_PER_WORKER, first_repeat
from shared.envsettings import (
    ENGINE_IDENTITY,
    ENGINE_NATS_URL_ENV,
    credentials_on_command_line,
    credentials_path,
    identity_secret,
    with_user,
    without_user,
)
from shared.host.report_auth import MASTER_KEY_ENV, master_key_text, parse_key
from shared.settings import Settings, load_settings_or_exit

PROG = "python -m services.workers"

# flag -> (least, most) of the numbers a fleet can run with; each comparison is False for NaN, so NaN is refused
_RANGES: dict[str, tuple[float, float]] = {
    "count": (0, MAX_EMULATED_WORKERS),
    "start_index": (0, 1e9),
    "gpus": (0, MAX_GPUS_PER_WORKER),
    "vram_gib": (1e-3, 1e9),  # NaN or inf crashed the fleet at start (a traceback); 0 GiB is refused at registration
    "ram_gib": (1e-3, 1e9),
    "heartbeat_interval": (0.01, 3600.0),  # 0 spun the loop and flooded the bus with heartbeats
    "download_delay": (0.0, 86400.0),
    "start_delay": (0.0, 86400.0),
    "engine_start_timeout": (0.1, 86400.0),
    "drain_settle": (0.0, 86400.0),
}


def out_of_range(a: argparse.Namespace) -> str | None:
    """Why a number on the command line is one no fleet can run with (None: every one is in range)."""
    for name, (least, most) in _RANGES.items():
        value = getattr(a, name)
        if not least <= value <= most:
            return f"--{name.replace('_', '-')} must be in [{least:g}, {most:g}], got {value}"
    return None


def parse(argv: list[str] | None = None) -> FleetConfig:
    """Fleet shape from the command line (timings default to the GANTRY_* settings)."""
    settings = load_settings_or_exit(PROG)
    p = argparse.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("--count", type=int, default=4, help="number of workers")
    p.add_argument("--prefix", default="w", help="worker name prefix")
    p.add_argument("--start-index", type=int, default=0, help="first worker number")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per worker")
    p.add_argument("--gpu-product", default="H100-SXM-80GB")
    p.add_argument("--gpu-vendor", default="cuda")
    p.add_argument("--vram-gib", type=float, default=80.0)
    p.add_argument("--ram-gib", type=float, default=1024.0)
    p.add_argument("--label", action="append", default=[], help="worker label key=value (repeatable)")
    p.add_argument("--cluster", default="default")
    p.add_argument("--heartbeat-interval", type=float, default=settings.heartbeat_interval_s)
    p.add_argument("--sync-window", type=float, default=2.0,
                   help="seconds: each worker answers sync requests by registering at most once per this window "
                        "(the first at once, later ones by one registration when it closes)")
    p.add_argument("--download-delay", type=float, default=0.5, help="seconds until model files are READY")
    p.add_argument("--start-delay", type=float, default=0.2, help="seconds SCHEDULED → RUNNING")
    p.add_argument("--ready-file", action="append", default=[], help="model source already on disk")
    p.add_argument("--engines", action="store_true",
                   help="run an emulated engine server per instance (RUNNING once it answers; drains for real)")
    p.add_argument("--engine-nats-url", default=None,
                   help=f"NATS URL the engine servers publish on, without credentials (a command line is readable "
                        f"by every local user: a URL with the engine identity's secret goes in "
                        f"${ENGINE_NATS_URL_ENV}; default that, else the fleet's NATS server as the engine "
                        f"identity when GANTRY_CREDENTIALS_FILE holds it, else without credentials)")
    p.add_argument("--engine-start-timeout", type=float, default=30.0, help="seconds a server has to answer /health")
    p.add_argument("--drain-settle", type=float, default=1.0,
                   help="seconds a drain lasts at least (requests routed just before it may still arrive)")
    p.add_argument("--engine-arg", action="append", default=[],
                   help="one more engine server flag, e.g. --engine-arg=--speedup=4 (repeatable)")
    a = p.parse_args(argv)
    if refused := credentials_on_command_line("--engine-nats-url", a.engine_nats_url, ENGINE_NATS_URL_ENV):
        sys.exit(f"{p.prog}: error: {refused}")
    if not 0 <= a.sync_window < math.inf:  # nan and inf too: a worker would answer one request, then none
        p.error(f"--sync-window is a finite duration in seconds, got {a.sync_window}")
    if why := out_of_range(a):
        p.error(why)
    if bad := [kv for kv in a.label if "=" not in kv]:
        p.error(f"--label takes key=value, got {bad[0]!r}")
    pairs = [kv.split("=", 1) for kv in a.label]
    labels = dict(pairs)
    if (twice := first_repeat(key for key, _ in pairs)) is not None:  # the last would win, silently
        p.error(f"--label {twice!r} is given more than once")
    lent = (a.engine_nats_url or os.environ.get(ENGINE_NATS_URL_ENV) or engine_url(settings)) if a.engines else None
    try:
        master = master_key_text(os.environ, settings.credentials_file) if a.engines else None
        report_master = parse_key(master, f"${MASTER_KEY_ENV}") if master else None
    except ValueError as err:
        p.error(str(err))
    cfg = FleetConfig(
        count=a.count, prefix=a.prefix, start_index=a.start_index, gpus=a.gpus, gpu_product=a.gpu_product,
        gpu_vendor=a.gpu_vendor, vram_gib=a.vram_gib, ram_gib=a.ram_gib, labels=labels, cluster=a.cluster,
        heartbeat_interval_s=a.heartbeat_interval, sync_window_s=a.sync_window, download_delay_s=a.download_delay,
        start_delay_s=a.start_delay, ready_files=tuple(a.ready_file), engines=a.engines,
        engine_nats_url=lent, engine_report_master=report_master,
        engine_start_timeout_s=a.engine_start_timeout, drain_settle_s=a.drain_settle, engine_args=tuple(a.engine_arg),
    )
    if why := fleet_problem(cfg):  # a worker the state would refuse: every heartbeat dead-lettered
        p.error(why)
    return cfg


def engine_url(settings: Settings) -> str:
    """The fleet's NATS server as the engine identity, from the credentials file the settings name (compose
    mounts one in every Gantry container); without credentials when none is named or it lacks the identity."""
    bare = without_user(settings.nats_url)  # the fleet never lends its own identity to its servers
    if not settings.credentials_file:  # gantry up lends the URL through the environment instead
        return bare
    secret = identity_secret(credentials_path(settings.credentials_file), ENGINE_IDENTITY)
    return with_user(bare, ENGINE_IDENTITY, secret) if secret else bare


async def _run(cfg: FleetConfig, url: str, options: dict[str, object]) -> None:
    """Run the fleet; with engines, SIGTERM cancels it so that it stops its servers on the way out."""
    task = asyncio.ensure_future(run_fleet(cfg, url, options))
    if cfg.engines:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    logging.basicConfig(level=logging.WARNING)
    cfg = parse(argv)
    settings = load_settings_or_exit(PROG)
    uvloop.run(_run(cfg, settings.nats_url, nats_options(settings)))


if __name__ == "__main__":
    main()
