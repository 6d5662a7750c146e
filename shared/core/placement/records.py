"""Stored worker records judged against today's limits, and which invalid ones to report (pure, no I/O).

A worker's inventory in Redis was checked when it was stored, but against the limits of the build that stored it:
one written by an older build, or edited by hand, can break today's. Every reader leaves such a record out (it
must never crash a snapshot's load nor hide the good ones), so its worker vanishes from every snapshot. These
functions say why, in one line, so that the state writer can report it once and the CLI can show it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import msgspec

from shared.core.limits import bad_worker_name
from shared.core.placement.domain import Worker

REASON_CHARS = 200
"""A reason is cut to this many characters: it goes into a log line, a dead letter and a CLI row."""

_decoder = msgspec.json.Decoder(Worker)


def one_line(text: str, limit: int = REASON_CHARS) -> str:
    """``text`` on one line (any run of whitespace, newlines included, as one space), at most ``limit`` chars."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def worker_problem(key: str, worker: Worker) -> str | None:
    """Why a decoded record stored under ``key`` is not a worker today's checks accept (None: it is): the same
    checks a registration passes (``shared.bus.validate.check_registration``), and its name must be its key."""
    reason = bad_worker_name(worker.name)
    if reason:
        return reason
    if worker.name != key:
        return f"the record names worker {worker.name[:64]!r}, stored under {key[:64]!r}"
    indexes = [g.index for g in worker.gpus]
    if len(set(indexes)) != len(indexes):
        return f"duplicate GPU indexes {indexes[:16]}"
    return None


def read_worker(key: str, raw: bytes | str) -> Worker | str:
    """The worker a stored record holds, or the one-line reason it is invalid today."""
    try:
        worker = _decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        return one_line(str(exc) or type(exc).__name__)
    problem = worker_problem(key, worker)
    return worker if problem is None else one_line(problem)


@dataclass(frozen=True)
class InvalidReports:
    """What the state writer does about invalid stored records: report these (worker -> reason), forget the marks
    of these (their records were repaired or removed, so a record broken again is reported again)."""

    report: dict[str, str]
    forget: tuple[str, ...]


def invalid_reports(invalid: Mapping[str, str], reported: Mapping[str, str]) -> InvalidReports:
    """Each invalid record (worker -> reason) is reported once: again only when its reason changed (another bad
    record under the same key), never once per snapshot or per check."""
    report = {name: why for name, why in sorted(invalid.items()) if reported.get(name) != why}
    forget = tuple(sorted(name for name in reported if name not in invalid))
    return InvalidReports(report=report, forget=forget)
