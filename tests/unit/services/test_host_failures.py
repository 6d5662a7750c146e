"""Which failures the host retries (the infrastructure's) and which it dead-letters (the message's)."""

from __future__ import annotations

import nats.errors
import nats.js.errors
import pytest
import redis.exceptions

from shared.host.isolation import failure_reason, transient

CASES: list[tuple[str, BaseException, bool]] = [
    ("redis unreachable", redis.exceptions.ConnectionError("Connection refused"), True),
    ("redis timeout", redis.exceptions.TimeoutError("Timeout reading from socket"), True),
    ("redis loading", redis.exceptions.BusyLoadingError("LOADING Redis is loading the dataset"), True),
    ("redis busy script", redis.exceptions.ResponseError("BUSY Redis is busy running a script"), True),
    ("redis script error", redis.exceptions.ResponseError("ERR Error running script: bad argument"), False),
    ("nats timeout", nats.errors.TimeoutError(), True),
    ("nats closed", nats.errors.ConnectionClosedError(), True),
    ("nats no responders", nats.errors.NoRespondersError(), True),
    ("jetstream unavailable", nats.js.errors.ServiceUnavailableError(), True),
    ("converge lock busy", TimeoutError("converge lock of m busy"), True),
    ("socket", ConnectionResetError("reset by peer"), True),
    ("payload too large", nats.errors.MaxPayloadError(), False),
    ("key", KeyError("ghost"), False),
    ("index", IndexError("tuple index out of range"), False),
    ("overflow", OverflowError("Python int too large to convert to C long"), False),
    ("recursion", RecursionError("maximum recursion depth exceeded"), False),
    ("value", ValueError("anything"), False),
    ("assertion", AssertionError(), False),
]


@pytest.mark.parametrize(("exc", "retried"), [(e, r) for _, e, r in CASES], ids=[n for n, _, _ in CASES])
def test_only_failures_of_nats_or_redis_are_retried(exc: BaseException, retried: bool) -> None:
    assert transient(exc) is retried


def test_a_failure_reason_is_one_bounded_line_with_the_type() -> None:
    reason = failure_reason(ValueError("line one\nline two " + "x" * 5000))
    assert reason.startswith("ValueError: line one line two ")
    assert "\n" not in reason and len(reason) <= len("ValueError: ") + 400
    assert failure_reason(KeyError()) == "KeyError"
