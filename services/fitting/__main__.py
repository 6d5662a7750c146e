"""``python -m services.fitting``."""

from __future__ import annotations

from services.fitting.service import FittingService
from shared.host.service import serve


def main() -> None:
    """Run one fitting replica until stopped."""
    serve(FittingService)


if __name__ == "__main__":
    main()
