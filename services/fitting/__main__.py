"""``python -m services.fitting``."""

from __future__ import annotations

import asyncio
import logging

from services.fitting.service import FittingService
from shared.settings import load_settings


def main() -> None:
    """Run one fitting replica until stopped."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(FittingService(load_settings()).app.run())


if __name__ == "__main__":
    main()
