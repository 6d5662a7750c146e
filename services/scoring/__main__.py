"""``python -m services.scoring``."""

from __future__ import annotations

import asyncio
import logging

from services.scoring.service import ScoringService
from shared.settings import load_settings


def main() -> None:
    """Run one scoring replica until stopped."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(ScoringService(load_settings()).app.run())


if __name__ == "__main__":
    main()
