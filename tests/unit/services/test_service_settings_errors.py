"""A service started with an invalid GANTRY_* value stops at once with one line naming the setting (exit 2), as a
command-line error does, instead of a validation traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(("module", "argv"), [
    ("services.filter", []), ("services.reconciler", []), ("services.workers", []),
    ("services.gateway", ["--eds-path", "unused.json"]), ("services.picker", ["--nats-url", "nats://127.0.0.1:1"]),
])
@pytest.mark.parametrize(("key", "value", "why"), [
    ("GANTRY_REDIS_URL", "redis://127.0.0.1:1/gantry",
     "invalid setting GANTRY_REDIS_URL: the database (the path of the URL) must be a number, got 'gantry'"),
    ("GANTRY_HEARTBEAT_INTERVAL_S", "-1",
     "invalid setting GANTRY_HEARTBEAT_INTERVAL_S: Input should be greater than 0"),
])
def test_an_invalid_setting_stops_the_service_in_one_line(
        module: str, argv: list[str], key: str, value: str, why: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GANTRY_")}
    env[key] = value
    done = subprocess.run([sys.executable, "-m", module, *argv], cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"python -m {module}: error: {why}\n"
