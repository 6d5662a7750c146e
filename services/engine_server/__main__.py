"""``python -m services.engine_server``: run one emulated model server."""

from __future__ import annotations

import sys

from services.engine_server.server import parse_args, serve
from shared.catalog import UnknownGpuError, UnknownModelError


def main(argv: list[str] | None = None) -> None:
    """Parse options and serve; bad options exit 2 with one line."""
    opts = parse_args(argv)
    try:
        serve(opts)
    except (UnknownModelError, UnknownGpuError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
