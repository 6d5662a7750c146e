"""The broker's parameters: the seed's table (``scheduler_*`` names), typed, with units made explicit.

Units. FastDeploy is inconsistent: its docs give every period in seconds, while its code sleeps
``sync_period / 1000`` and compares heartbeats against ``expire_period / 1000`` (milliseconds), so the
documented defaults (sync 5, expire 3000) mean either "heartbeat every 5 s, dead after 50 min" or "every
5 ms, dead after 3 s". Gantry uses **seconds for every duration**, as the seed's table says, and accepts a
string with an explicit unit (``"500ms"``, ``"5s"``, ``"2m"``) wherever a duration is expected. Defaults
follow the table except ``scheduler_expire_period``: 15 s (three missed heartbeats), because neither of
FastDeploy's readings of 3000 is a usable heartbeat expiry with a 5 s period. Validation insists the
expiry outlasts two heartbeat periods.

Global mode uses the same heartbeat parameters (FastDeploy hard-codes a 30 s liveness key refreshed every
15 s there).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Literal

SchedulerName = Literal["local", "global", "splitwise"]
SCHEDULER_NAMES: tuple[str, ...] = ("local", "global", "splitwise")
UNBOUNDED = -1

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class ParamError(ValueError):
    """One or more broker parameters are unusable; the message lists every problem."""


@dataclass(frozen=True, slots=True)
class SchedulerParams:
    """Typed broker configuration; every duration is in seconds (field names end in ``_s``)."""

    name: SchedulerName = "local"
    max_size: int = UNBOUNDED  # requests held (queued + dispatched, unfinished); -1 = unbounded
    ttl_s: float = 900.0  # longest a request may wait in the broker before it is answered "expired"
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    password: str = ""
    topic: str = "default"
    min_load_score: float = 3.0  # a peer is stolen from only when this many requests are queued there
    load_shards_num: int = 1
    sync_period_s: float = 5.0  # heartbeat (and load report) period
    expire_period_s: float = 15.0  # a node whose last heartbeat is older than this is dead
    release_load_expire_period_s: float = 600.0  # splitwise: load of a request with no result this long is dropped
    reader_parallel: int = 4
    writer_parallel: int = 4
    reader_batch_size: int = 200
    writer_batch_size: int = 200

    def problems(self) -> list[str]:
        """Every violated constraint as a sentence naming the seed's parameter (empty when usable)."""
        out: list[str] = []
        if self.name not in SCHEDULER_NAMES:
            out.append(f"scheduler_name must be one of {', '.join(SCHEDULER_NAMES)} (got {self.name!r})")
        if self.max_size != UNBOUNDED and self.max_size < 1:
            out.append(f"scheduler_max_size must be -1 (unbounded) or >= 1 request (got {self.max_size})")
        for key, value in (("scheduler_ttl", self.ttl_s), ("scheduler_sync_period", self.sync_period_s),
                           ("scheduler_expire_period", self.expire_period_s),
                           ("scheduler_release_load_expire_period", self.release_load_expire_period_s)):
            if not (math.isfinite(value) and value > 0):
                out.append(f"{key} must be a positive, finite number of seconds (got {value!r})")
        if self.expire_period_s < 2 * self.sync_period_s:
            out.append(f"scheduler_expire_period ({self.expire_period_s:g} s) must be >= 2 x scheduler_sync_period "
                       f"({self.sync_period_s:g} s): a live node would be declared dead between two heartbeats")
        if not 0 < self.port < 65536:
            out.append(f"scheduler_port must be in 1..65535 (got {self.port})")
        if self.db < 0:
            out.append(f"scheduler_db must be >= 0 (got {self.db})")
        if not self.topic or any(c.isspace() or c in "*?[]{}" for c in self.topic):
            out.append(f"scheduler_topic must be non-empty without spaces, wildcards or braces (got {self.topic!r})")
        if not (math.isfinite(self.min_load_score) and self.min_load_score >= 1):
            out.append(f"scheduler_min_load_score must be >= 1 queued request (got {self.min_load_score!r})")
        for key, value in (("scheduler_load_shards_num", self.load_shards_num),
                           ("scheduler_reader_parallel", self.reader_parallel),
                           ("scheduler_writer_parallel", self.writer_parallel),
                           ("scheduler_reader_batch_size", self.reader_batch_size),
                           ("scheduler_writer_batch_size", self.writer_batch_size)):
            if value < 1:
                out.append(f"{key} must be >= 1 (got {value})")
        return out

    def checked(self) -> SchedulerParams:
        """``self`` when usable; raises :class:`ParamError` listing every problem otherwise."""
        problems = self.problems()
        if problems:
            raise ParamError("; ".join(problems))
        return self

    @classmethod
    def from_mapping(cls, raw: Mapping[str, object]) -> SchedulerParams:
        """Parameters from the seed's names (``scheduler_ttl: "30s"``...); raises :class:`ParamError`."""
        kwargs: dict[str, object] = {}
        problems: list[str] = []
        for key, value in raw.items():
            spec = _SPECS.get(key)
            if spec is None:
                problems.append(f"unknown parameter {key!r} (known: {', '.join(sorted(_SPECS))})")
                continue
            field_name, kind = spec
            try:
                kwargs[field_name] = _convert(key, kind, value)
            except ParamError as err:
                problems.append(str(err))
        if problems:
            raise ParamError("; ".join(problems))
        return cls(**kwargs).checked()  # type: ignore[arg-type]


def parse_duration(key: str, value: object) -> float:
    """Seconds from a number (seconds) or a string with a unit (``"250ms"``, ``"5s"``, ``"2m"``, ``"1h"``)."""
    if isinstance(value, bool):
        raise ParamError(f"{key} must be a duration, got a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if m is None:
            raise ParamError(f"{key} must be a duration like 5, '5s' or '500ms' (got {value!r})")
        seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    else:
        raise ParamError(f"{key} must be a duration in seconds, got {type(value).__name__}")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ParamError(f"{key} must be a positive, finite duration (got {value!r})")
    return seconds


def _convert(key: str, kind: str, value: object) -> object:
    if kind == "duration":
        return parse_duration(key, value)
    if isinstance(value, bool):
        raise ParamError(f"{key} must be {kind}, got a boolean")
    if kind == "int":
        if isinstance(value, int):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            return int(value)
        raise ParamError(f"{key} must be an integer (got {value!r})")
    if kind == "float":
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ParamError(f"{key} must be a number (got {value!r})")
    if not isinstance(value, str):
        raise ParamError(f"{key} must be a string (got {value!r})")
    return value


_SPECS: dict[str, tuple[str, str]] = {
    "scheduler_name": ("name", "str"),
    "scheduler_max_size": ("max_size", "int"),
    "scheduler_ttl": ("ttl_s", "duration"),
    "scheduler_host": ("host", "str"),
    "scheduler_port": ("port", "int"),
    "scheduler_db": ("db", "int"),
    "scheduler_password": ("password", "str"),
    "scheduler_topic": ("topic", "str"),
    "scheduler_min_load_score": ("min_load_score", "float"),
    "scheduler_load_shards_num": ("load_shards_num", "int"),
    "scheduler_sync_period": ("sync_period_s", "duration"),
    "scheduler_expire_period": ("expire_period_s", "duration"),
    "scheduler_release_load_expire_period": ("release_load_expire_period_s", "duration"),
    "scheduler_reader_parallel": ("reader_parallel", "int"),
    "scheduler_writer_parallel": ("writer_parallel", "int"),
    "scheduler_reader_batch_size": ("reader_batch_size", "int"),
    "scheduler_writer_batch_size": ("writer_batch_size", "int"),
}
assert {f for f, _ in _SPECS.values()} == {f.name for f in fields(SchedulerParams)}
