"""Dry-run scenarios for ``gantry place``: a cluster, its instances and file readiness, and one model.

Pure: decodes bytes the caller has read. Size fields accept bytes (integers) or strings with a unit
(``"80GiB"``, ``"512 GiB"``, ``"13.5GB"``, ``"64MiB"``). Any problem raises ``ScenarioError`` with one line.
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgspec

from shared.core.limits import MAX_REPLICAS, MAX_TIME, decimal
from shared.core.placement.domain import Instance, ModelFile, ModelSpec, Worker
from shared.core.placement.profile import Profile
from shared.core.placement.registry import validate_profile
from shared.core.placement.snapshot import ClusterSnapshot, SnapshotConfig

SIZE_FIELDS = frozenset({
    "vram_total", "vram_used", "ram_total", "ram_used", "vram_claim", "ram_claim", "weight_bytes",
    "layer_bytes", "non_layer_bytes", "kv_bytes_per_token_per_layer", "vram_claims", "vram_reserve",
    "ram_reserve",
})
_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


class ScenarioError(ValueError):
    """A scenario that cannot be used, with a one-line explanation."""


class Scenario(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything a dry run needs; ``now`` defaults to the newest heartbeat."""

    model: ModelSpec
    workers: tuple[Worker, ...]
    description: str = ""
    now: float | None = None
    replicas: int | None = None  # how many to place; default: the model's replicas
    instances: tuple[Instance, ...] = ()
    model_files: tuple[ModelFile, ...] = ()
    config: SnapshotConfig = msgspec.field(default_factory=SnapshotConfig)
    profile: Profile | None = None

    @property
    def clock(self) -> float:
        """The time liveness is judged at."""
        if self.now is not None:
            return self.now
        return max((w.last_heartbeat for w in self.workers), default=0.0)

    def snapshot(self) -> ClusterSnapshot:
        """A snapshot holding the scenario's workers, instances and file readiness."""
        return ClusterSnapshot.from_parts(self.workers, self.instances, self.model_files, self.config)


def parse_size(value: Any, where: str) -> Any:
    """Bytes from an integer or a string with a unit; other values are returned for msgspec to judge."""
    if isinstance(value, str):
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ScenarioError(f"{where}: {value!r} is not a size (use bytes or e.g. \"80GiB\")")
        size = float(match.group(1)) * _UNITS[unit]
        if not math.isfinite(size):  # hundreds of digits: past the float range, refused here, not by int()
            raise ScenarioError(f"{where}: {value[:40]!r}... is too large a size")
        return int(size)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


SIZES_DEPTH = 16  # no size field lies deeper in a scenario; below it values are left to the schema's own checks


def _sizes(obj: Any, where: str = "$", depth: int = 0) -> Any:
    if depth > SIZES_DEPTH:  # (a 700-deep list under a field the schema refuses overflowed Python's recursion here)
        return obj
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            path = f"{where}.{key}"
            if key in SIZE_FIELDS:
                value = [parse_size(v, path) for v in value] if isinstance(value, list) else parse_size(value, path)
            out[key] = _sizes(value, path, depth + 1)
        return out
    if isinstance(obj, list):
        return [_sizes(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(obj)]
    return obj


def _check(s: Scenario) -> None:
    names = [w.name for w in s.workers]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ScenarioError(f"duplicate worker names: {', '.join(dupes)}")
    for w in s.workers:
        indexes = [g.index for g in w.gpus]
        if len(set(indexes)) != len(indexes):
            raise ScenarioError(f"worker {w.name}: duplicate GPU indexes")
        for g in w.gpus:
            if g.vram_total <= 0 or g.vram_used < 0:
                raise ScenarioError(f"worker {w.name} gpu {g.index}: vram_total must be > 0 and vram_used >= 0")
    ids = [i.id for i in s.instances]
    if len(set(ids)) != len(ids):
        raise ScenarioError("duplicate instance ids")
    for inst in s.instances:
        shares: list[tuple[str | None, tuple[int, ...], tuple[int, ...]]] = [
            (inst.worker, inst.gpu_indexes, inst.vram_claims)
        ]
        shares += [(x.worker, x.gpu_indexes, x.vram_claims) for x in inst.subordinates]
        for worker, gpu_indexes, claims in shares:
            if len(gpu_indexes) != len(claims):
                raise ScenarioError(f"instance {inst.id}: gpu_indexes and vram_claims differ in length on {worker}")
    selector = s.model.gpu_selector
    for gpu_id in selector.gpu_ids if selector else ():
        worker, sep, index = gpu_id.rpartition(":")
        if not sep or not worker or not decimal(index):
            raise ScenarioError(f"gpu id {gpu_id!r} is not of the form worker:index")
    if s.model.replicas < 0 or (s.replicas is not None and s.replicas < 1):
        raise ScenarioError("replicas must be at least 1")
    if s.replicas is not None and s.replicas > MAX_REPLICAS:  # each one is a placement run: bound the work
        raise ScenarioError(f"replicas must be at most {MAX_REPLICAS}")
    if s.now is not None and not 0 <= s.now <= MAX_TIME:
        raise ScenarioError(f"now must be between 0 and {MAX_TIME:.0e} seconds")


def load_scenario(data: bytes | str) -> Scenario:
    """Decode and check a JSON scenario; raises ScenarioError with a one-line message."""
    try:
        raw = msgspec.json.decode(data)
    except msgspec.DecodeError as err:
        raise ScenarioError(f"not valid JSON: {err}") from None
    except RecursionError:
        raise ScenarioError("not valid JSON: nested too deeply") from None
    if not isinstance(raw, dict):
        raise ScenarioError("a scenario is a JSON object with at least \"model\" and \"workers\"")
    try:
        scenario = msgspec.convert(_sizes(raw), Scenario)
    except msgspec.ValidationError as err:
        raise ScenarioError(f"invalid scenario: {err}") from None
    except RecursionError:  # within the decoder's depth but past Python's: two frames a level in ``_sizes``
        raise ScenarioError("not valid JSON: nested too deeply") from None
    _check(scenario)
    if scenario.profile is not None:
        try:
            validate_profile(scenario.profile)
        except ValueError as err:
            raise ScenarioError(str(err)) from None
    return scenario
