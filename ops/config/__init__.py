"""Server configuration files shipped with Gantry (the NATS base configuration)."""

from pathlib import Path

NATS_CONFIG = Path(__file__).parent / "nats.conf"
