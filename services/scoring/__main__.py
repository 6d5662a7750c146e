"""``python -m services.scoring``."""

from __future__ import annotations

from services.scoring.service import ScoringService
from shared.host.service import serve


def main() -> None:
    """Run one scoring replica until stopped."""
    serve(ScoringService)


if __name__ == "__main__":
    main()
