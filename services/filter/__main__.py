"""``python -m services.filter``."""

from __future__ import annotations

import asyncio
import logging

from services.filter.service import FilterService
from shared.settings import load_settings


def main() -> None:
    """Run one filter replica until stopped."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(FilterService(load_settings()).app.run())


if __name__ == "__main__":
    main()
