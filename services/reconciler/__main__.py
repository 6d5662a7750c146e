"""``python -m services.reconciler``."""

from __future__ import annotations

from services.reconciler.service import Reconciler
from shared.host.service import serve


def main() -> None:
    """Run one reconciler replica until stopped."""
    serve(Reconciler)


if __name__ == "__main__":
    main()
