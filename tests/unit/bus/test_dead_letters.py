"""What counts as a dead letter delivered back to a service (``shared.bus.runtime.is_dead_letter``): exactly what
``Bus.dead_letter`` publishes, so a rejected dead letter is not published again."""

from __future__ import annotations

import msgspec
import pytest

from shared.bus.messages import ErrorEvent, Heartbeat, encode
from shared.bus.runtime import is_dead_letter

LETTER = encode(ErrorEvent(service="gateway", subject="gantry.gateway.outcomes", reason="invalid", payload="{}"))


@pytest.mark.parametrize(("payload", "expected"), [
    (LETTER, True),
    (b"  \n" + LETTER, True),  # leading whitespace is still JSON
    (msgspec.json.encode({"service": "x", "subject": "y", "reason": "z"}), True),
    # another message with the three fields added (a forged report hiding from the dead letters) is not one
    (msgspec.json.encode({"service": "x", "subject": "y", "reason": "z", "extra": [1]}), False),
    (msgspec.json.encode({"worker": "w0", "service": "x", "subject": "y", "reason": "z"}), False),
    (encode(Heartbeat(worker="w0")), False),
    (msgspec.json.encode({"service": "x", "subject": "y"}), False),  # no reason
    (msgspec.json.encode({"service": 1, "subject": "y", "reason": "z"}), False),  # wrong type
    (b"not json", False),
    (b"", False),
    (b"[" * 100_000, False),
    (b"{" + b" " * (2 << 20) + b"}", False),  # over the size any message may have
])
def test_only_an_error_event_reads_as_a_dead_letter(payload: bytes, expected: bool) -> None:
    assert is_dead_letter(payload) is expected


def test_an_error_event_with_every_field_written_is_a_dead_letter() -> None:
    full = msgspec.json.encode({f: getattr(ErrorEvent(service="s", subject="x", reason="r", payload="p", at=1.0), f)
                                for f in ErrorEvent.__struct_fields__})  # defaults written out too
    assert is_dead_letter(full)
