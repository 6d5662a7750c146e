"""The feed relay child connects to NATS as every Gantry client does: credentials from its URL, and TLS with the
picker's CA when the stack runs NATS over TLS."""

from __future__ import annotations

import ssl

import pytest

from services.gateway import feed_relay
from services.gateway.feed_relay import NATS_URL_ENV, TLS_CA_ENV, FeedRelay, Relayed

URL = "nats://picker:secret@127.0.0.1:4222"


async def deliver(batch: list[Relayed]) -> None:
    pass


def test_the_child_is_given_the_ca_and_connects_with_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    env = FeedRelay(URL, 0.01, deliver, tls_ca_file="/stack/ca.pem").child_env()
    assert env[NATS_URL_ENV] == URL and env[TLS_CA_ENV] == "/stack/ca.pem"
    heard: dict[str, object] = {}

    async def relay(nats_url: str, window_s: float, tls_ca_file: str = "") -> None:
        heard.update(url=nats_url, ca=tls_ca_file)

    monkeypatch.setattr(feed_relay, "relay", relay)
    for name in (NATS_URL_ENV, TLS_CA_ENV):
        monkeypatch.setenv(name, env[name])
    feed_relay.main(["--window-ms", "10"])
    assert heard == {"url": URL, "ca": "/stack/ca.pem"}
    monkeypatch.setattr(ssl, "create_default_context", lambda cafile: ("context", cafile))
    options = feed_relay.connect_options(URL, "/stack/ca.pem")
    assert options["tls"] == ("context", "/stack/ca.pem") and options["user"] == "picker"
    assert "tls" not in feed_relay.connect_options(URL, "")
