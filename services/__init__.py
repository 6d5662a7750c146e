"""Deployable Gantry services, one package each (``python -m services.<name>``).

``SERVICE_COMMANDS`` is the canonical argv of every placement service process; ``gantry up``, the
docker-compose file and the integration tests start exactly these.
"""

from __future__ import annotations

SERVICE_COMMANDS: dict[str, list[str]] = {
    "filter": ["python", "-m", "services.filter"],
    "fitting": ["python", "-m", "services.fitting"],
    "scoring": ["python", "-m", "services.scoring"],
    "reconciler": ["python", "-m", "services.reconciler"],
}
"""Placement services: name -> argv (configured through GANTRY_* environment variables)."""

WORKERS_COMMAND: list[str] = ["python", "-m", "services.workers"]
"""Emulated GPU workers (append e.g. ``--count 8 --gpus 8``)."""
