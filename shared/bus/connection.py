"""How any Gantry process connects to NATS: its reply inboxes and TLS trust, from the settings.

Kept apart from ``shared.bus.runtime`` (FastStream, the pull loop) so that a short-lived client such as the
CLI can connect without importing the service machinery.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from shared.envsettings import EnvSettings
    from shared.settings import Settings

INBOX = "_INBOX"


def inbox_prefix(identity: str) -> str:
    """Where ``identity``'s replies arrive (JetStream acks, pull deliveries): under its own name, so that the bus
    can let each identity read only its own replies (ops.auth)."""
    return f"{INBOX}.{identity}" if identity else INBOX


def url_credentials(url: str) -> dict[str, str]:
    """The credentials in ``url``'s userinfo, percent-decoded, as nats-py's ``user``/``password`` (or ``token``)
    options. nats-py sends the userinfo of a URL as written, without decoding it, while Gantry writes URLs with
    the user and secret percent-encoded (``shared.envsettings.with_user``); explicit options win over the URL's
    userinfo in nats-py, so a secret holding reserved characters still authenticates."""
    parts = urlsplit(url)
    if parts.username is None:
        return {}
    if parts.password is None:  # nats://TOKEN@host
        return {"token": unquote(parts.username)}
    return {"user": unquote(parts.username), "password": unquote(parts.password)}


def nats_options(settings: Settings | EnvSettings) -> dict[str, Any]:
    """Options every Gantry NATS connection takes from the settings: its credentials (decoded from the URL), its
    identity's reply inboxes, and the CA to trust when TLS is on."""
    credentials = url_credentials(settings.nats_url)
    identity = settings.identity or credentials.get("user") or ""
    options: dict[str, Any] = {**credentials, "inbox_prefix": inbox_prefix(identity)}
    if settings.tls_ca_file:
        options["tls"] = ssl.create_default_context(cafile=settings.tls_ca_file)
    return options
