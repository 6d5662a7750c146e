"""Provisioning of Gantry's JetStream streams and durable consumers: an operator's step, run as an identity with
the rights (the admin) before the services start. `gantry up` does it; ``python -m ops.provision`` does it for
compose. Services only check that what they read exists (``shared.bus.runtime.await_provisioned``)."""

from __future__ import annotations

import asyncio
import sys

from shared.bus.runtime import nats_options, prepare
from shared.bus.streams import ALL_CONSUMERS
from shared.envsettings import without_user
from shared.settings import Settings


async def provision(settings: Settings, timeout: float = 5.0) -> None:
    """Declare every stream and durable consumer (create what is missing; update a stream only when its
    configuration differs)."""
    import nats

    nc = await nats.connect(settings.nats_url, connect_timeout=timeout, **nats_options(settings))
    try:
        await prepare(nc, settings, ALL_CONSUMERS)
    finally:
        await nc.close()


def main() -> int:
    """Provision with the environment's settings (GANTRY_IDENTITY=admin); one line and exit 1 on failure."""
    settings = Settings()
    try:
        asyncio.run(provision(settings))
    except Exception as exc:  # a CLI step: one line, non-zero exit
        print(f"provisioning the streams on {without_user(settings.nats_url)} failed: {exc}", file=sys.stderr)
        return 1
    print("streams and durable consumers provisioned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
