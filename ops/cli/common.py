"""What every CLI command shares: its connection options, how it reads the numbers a user types (``seconds``,
``whole``), and (from ``ops.cli.connect``, which has no typer) settings, fail-fast connections and output helpers.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer

from ops.cli.connect import (
    CONNECT_TIMEOUT_S,
    STACK_HINT,
    connect_nats,
    connect_redis,
    connection_settings,
    console,
    import_nats,
    load,
    print_json,
    redact,
    run_async,
)
from ops.cli.errors import Interrupted, quoted
from ops.cli.output import echo

__all__ = [
    "CONNECT_TIMEOUT_S", "MAX_WAIT_S", "STACK_HINT", "JsonFlag", "NatsUrl", "RedisUrl", "connect_nats",
    "connect_redis", "connection_settings", "console", "echo", "import_nats", "load", "print_json", "redact", "run",
    "seconds", "whole",
]

T = TypeVar("T")

NatsUrl = Annotated[
    str | None,
    typer.Option("--nats-url", help="NATS URL (env GANTRY_NATS_URL; default nats://127.0.0.1:4222)"),
]
RedisUrl = Annotated[
    str | None,
    typer.Option("--redis-url", help="Redis URL (env GANTRY_REDIS_URL; default redis://127.0.0.1:6379/0)"),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="print machine-readable JSON instead of a table")]

MAX_WAIT_S = 86_400.0
"""The longest any ``--timeout`` waits (a day): ``inf`` or ``1e400`` waited forever."""

# A number as the CLI reads it: ASCII digits (int() and float() also take "1_0", "+5", " 5" and other scripts'
# digits, which a typo can produce and nobody means), a decimal point and an exponent for seconds.
_WHOLE = re.compile(r"-?[0-9]+")
# one way to match each text: the old "[0-9]+\.?[0-9]*" split a run of digits between its two classes every way,
# quadratic in the digits before a stray character (a 20,000-character value took 8 s to refuse)
_DECIMAL = re.compile(r"-?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?")
_SHOWN = 40  # characters of a refused value shown back
_MAX_DIGITS = 4000  # a whole number longer than this is beyond every bound (and int() refuses 4300 digits)


def seconds(low: float, high: float = MAX_WAIT_S, unit: str = "seconds", **option: Any) -> Any:
    """A typer option (``Annotated[float, seconds(...)]``) for a duration in seconds (or ``unit``) within
    ``low..high``, both included. Every duration option takes this one rule: a bound above (``--timeout inf``
    waited forever), NaN refused as not a number, and a refusal that names the option and the bounds, as a one-line
    usage error."""

    def parse(value: str | float) -> float:
        if isinstance(value, float | int):  # the option's default
            return float(value)
        text = value.lower()
        if text in ("nan", "+nan", "-nan"):
            raise typer.BadParameter(f"{_shown(value)} is not a number")
        if not _DECIMAL.fullmatch(text) and text.lstrip("+-") not in ("inf", "infinity"):
            raise typer.BadParameter(f"expected a number of {unit}, got {_shown(value)}")
        number = float(text)
        if not low <= number <= high:
            raise typer.BadParameter(f"must be between {low:.15g} and {high:.15g} {unit}, got {_shown(value)}")
        return number

    return typer.Option(min=low, max=high, parser=parse, **option)  # min and max for --help; parse checks


def whole(low: int | None = None, high: int | None = None, **option: Any) -> Any:
    """A typer option or argument (``Annotated[int, whole(...)]``; ``argument=True`` for an argument) for a whole
    number written in plain ASCII digits, with an optional minus sign, within ``low..high`` when given (a command
    may check its own range, with its own message, on what this returns)."""
    argument = option.pop("argument", False)

    def parse(value: str | int) -> int:
        if isinstance(value, int):  # the option's default
            return value
        if not _WHOLE.fullmatch(value):
            raise typer.BadParameter(f"expected a whole number in plain digits (0-9), got {_shown(value)}")
        digits = len(value.lstrip("-0"))
        if digits > _MAX_DIGITS and low is None and high is None:
            raise typer.BadParameter(f"too large a number ({digits} digits)")
        number = int(value) if digits <= _MAX_DIGITS else None  # int() converts at most 4300 digits
        if number is None or (low is not None and number < low) or (high is not None and number > high):
            bounds = (f"between {low} and {high}" if low is not None and high is not None
                      else f"at least {low}" if low is not None else f"at most {high}")
            raise typer.BadParameter(f"must be {bounds}, got {_shown(value)}")
        return number

    if argument:
        return typer.Argument(min=low, max=high, parser=parse, **option)
    return typer.Option(min=low, max=high, parser=parse, **option)


def _shown(value: str) -> str:
    return quoted(value) if len(value) <= _SHOWN else f"{quoted(value[:_SHOWN])}... ({len(value)} characters)"


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run one command's coroutine; Ctrl-C ends it quietly with the conventional exit code."""
    try:
        return run_async(coro_fn)
    except Interrupted:
        raise typer.Exit(130) from None
