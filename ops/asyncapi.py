"""Generate the AsyncAPI contract of every Gantry service from the services' declarations.

``python -m ops.asyncapi`` writes ``docs/asyncapi.json``; ``--check`` exits 1 (one line on stderr) when the
committed file differs from what the declarations generate now.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ops.contract import CONTRACT as CLI
from services.engine_server.contract import CONTRACT as ENGINE_SERVER
from services.filter.service import FilterService
from services.fitting.service import FittingService
from services.gateway.contract import CONTRACT as GATEWAY
from services.picker.contract import CONTRACT as PICKER
from services.reconciler.service import Reconciler
from services.scoring.service import ScoringService
from services.workers.contract import CONTRACT as WORKERS
from shared.bus.messages import SCHEMA_VERSION
from shared.host.contract import Contract, asyncapi
from shared.paths import REPO_ROOT
from shared.settings import Settings

OUT = REPO_ROOT / "docs" / "asyncapi.json"


def contracts() -> list[Contract]:
    """Every party's contract: the CLI, the placement services' as their host builds it, workers, model
    servers, the gateway's picker, the NATS picker."""
    settings = Settings(profile="default")  # declarations do not depend on connection settings
    hosted = [kind(settings).contract() for kind in (Reconciler, FilterService, FittingService, ScoringService)]
    return [CLI, *hosted, WORKERS, ENGINE_SERVER, GATEWAY, PICKER]


def document() -> dict[str, Any]:
    """The AsyncAPI document (message schema version as the document version)."""
    return asyncapi(contracts(), version=f"schema-v{SCHEMA_VERSION}")


def render() -> str:
    """The document as committed: indented, keys sorted (FastStream's channel order varies from run to run), a
    final newline."""
    return json.dumps(document(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check``, compare) the contract file."""
    parser = argparse.ArgumentParser(prog="python -m ops.asyncapi", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed file is stale")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"{args.out} is stale: run python -m ops.asyncapi", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
