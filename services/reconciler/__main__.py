"""``python -m services.reconciler``."""

from __future__ import annotations

import asyncio
import logging

from services.reconciler.service import Reconciler
from shared.settings import load_settings


def main() -> None:
    """Run one reconciler replica until stopped."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(Reconciler(load_settings()).app.run())


if __name__ == "__main__":
    main()
