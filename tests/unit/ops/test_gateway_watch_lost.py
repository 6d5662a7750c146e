"""`gantry gateway --watch` ends with one line when NATS goes away under it, as `events --follow` does."""

from __future__ import annotations

from typing import Any

import pytest

import ops.cli.gateway as gateway_cli
from ops.cli.connect import run_async
from ops.cli.errors import CliError


class GoneAfterFirstFrame:
    """A NATS connection that the server closes after the first frame (the stack stopped: `gantry down`)."""

    is_connected = False

    def __init__(self) -> None:
        self.frames = 0

    @property
    def is_closed(self) -> bool:
        self.frames += 1
        return self.frames > 1

    async def subscribe(self, subject: str, cb: Any) -> None:
        return None


def test_watching_the_gateway_ends_with_one_line_when_nats_goes_away(monkeypatch: pytest.MonkeyPatch) -> None:
    shown: list[int] = []

    async def connect(settings: object, **options: object) -> GoneAfterFirstFrame:
        return GoneAfterFirstFrame()

    async def no_store(settings: object) -> None:
        return None

    monkeypatch.setattr(gateway_cli, "connect_nats", connect)
    monkeypatch.setattr(gateway_cli, "_connect_store", no_store)
    with pytest.raises(CliError) as failed:
        run_async(lambda: gateway_cli._listen(None, None, 0.01, 50, lambda rows: shown.append(len(rows))))
    assert str(failed.value).startswith("lost the connection to NATS (")
    assert failed.value.exit_code == 1
    assert len(shown) == 1  # the frame while it was up, then nothing stale
