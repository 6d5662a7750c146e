"""How any Gantry process connects to NATS: its reply inboxes and TLS trust, from the settings.

Kept apart from ``shared.bus.runtime`` (FastStream, the pull loop) so that a short-lived client such as the
CLI can connect without importing the service machinery.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from shared.envsettings import EnvSettings
    from shared.settings import Settings

INBOX = "_INBOX"


def inbox_prefix(identity: str) -> str:
    """Where ``identity``'s replies arrive (JetStream acks, pull deliveries): under its own name, so that the bus
    can let each identity read only its own replies (ops.auth)."""
    return f"{INBOX}.{identity}" if identity else INBOX


def nats_options(settings: Settings | EnvSettings) -> dict[str, Any]:
    """Options every Gantry NATS connection takes from the settings: its identity's reply inboxes, and the CA to
    trust when TLS is on."""
    identity = settings.identity or urlsplit(settings.nats_url).username or ""
    options: dict[str, Any] = {"inbox_prefix": inbox_prefix(identity)}
    if settings.tls_ca_file:
        options["tls"] = ssl.create_default_context(cafile=settings.tls_ca_file)
    return options
