"""``python -m services.workers``: run a fleet of emulated GPU workers."""

from __future__ import annotations

import argparse
import logging

import uvloop

from services.workers.emulator import FleetConfig, run_fleet
from shared.bus.runtime import nats_options
from shared.settings import load_settings


def parse(argv: list[str] | None = None) -> FleetConfig:
    """Fleet shape from the command line (timings default to the GANTRY_* settings)."""
    settings = load_settings()
    p = argparse.ArgumentParser(prog="python -m services.workers", description=__doc__)
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
    p.add_argument("--download-delay", type=float, default=0.5, help="seconds until model files are READY")
    p.add_argument("--start-delay", type=float, default=0.2, help="seconds SCHEDULED → RUNNING")
    p.add_argument("--ready-file", action="append", default=[], help="model source already on disk")
    a = p.parse_args(argv)
    labels = dict(kv.split("=", 1) for kv in a.label)
    return FleetConfig(
        count=a.count, prefix=a.prefix, start_index=a.start_index, gpus=a.gpus, gpu_product=a.gpu_product,
        gpu_vendor=a.gpu_vendor, vram_gib=a.vram_gib, ram_gib=a.ram_gib, labels=labels, cluster=a.cluster,
        heartbeat_interval_s=a.heartbeat_interval, download_delay_s=a.download_delay,
        start_delay_s=a.start_delay, ready_files=tuple(a.ready_file),
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    logging.basicConfig(level=logging.WARNING)
    cfg = parse(argv)
    settings = load_settings()
    uvloop.run(run_fleet(cfg, settings.nats_url, nats_options(settings)))


if __name__ == "__main__":
    main()
