"""``python -m services.filter``."""

from __future__ import annotations

from services.filter.service import FilterService
from shared.host.service import serve


def main() -> None:
    """Run one filter replica until stopped."""
    serve(FilterService)


if __name__ == "__main__":
    main()
