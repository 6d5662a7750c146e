"""The CLI's number rule reads a value in time linear in its length: its decimal pattern once split a run of
digits between two classes every way it could, so a long value with a stray character took seconds to refuse
(quadratic: 20,000 characters, 8 s; an argument's 128 KiB, minutes)."""

from __future__ import annotations

import time

import pytest
import typer

from ops.cli.common import seconds


def _parse(low: float = 0.0, high: float = 86_400.0):  # type: ignore[no-untyped-def]
    return seconds(low, high).parser


def test_a_long_value_with_a_stray_character_is_refused_at_once() -> None:
    parse = _parse()
    started = time.monotonic()
    for value in ("1" * 100_000 + "x", "1" * 100_000 + ".x", "." + "1" * 100_000 + "x"):
        with pytest.raises(typer.BadParameter, match="expected a number of seconds"):
            parse(value)
    assert time.monotonic() - started < 1.0  # each took minutes before


@pytest.mark.parametrize(("value", "number"), [
    ("5", 5.0), ("5.", 5.0), (".5", 0.5), ("5.25", 5.25), ("1e3", 1000.0), ("1.5E2", 150.0), ("2.e1", 20.0),
    (".5e1", 5.0), ("0", 0.0), ("1e-400", 0.0)])
def test_every_decimal_spelling_still_reads(value: str, number: float) -> None:
    assert _parse()(value) == number


@pytest.mark.parametrize("value", ["", " 5", "5 ", ".", "e5", "5e", "1_0", "+5", "\u22125", "\uff15", "5..1",
                                   "1.2.3", "0x10"])
def test_what_is_no_decimal_is_still_refused(value: str) -> None:
    with pytest.raises(typer.BadParameter, match="expected a number of seconds"):
        _parse()(value)
