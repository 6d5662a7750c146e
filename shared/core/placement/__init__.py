"""The pure placement core: snapshot, requirements, filter → fit → score stages, and scale-down ranking.

Public API (stable; additions only):

- ``ClusterSnapshot`` / ``SnapshotConfig``: in-memory cluster state updated from events.
- ``requirements(model, arch=None, gguf=None) -> ResourceRequest | Reason``
- ``run_filters(snapshot, model, now, profile) -> FilterResult``; its fast path with the survivors as a row mask:
  ``filter_rows(snapshot, model, now, profile) -> (mask, reports)``
- ``run_fitting(snapshot, model, request, survivors, profile) -> FitResult``
- ``run_scoring(snapshot, model, candidates, profile, filters=()) -> Decision``
- ``place(snapshot, model, now, profile, request=None, arch=None, gguf=None) -> Decision | Unschedulable``
- ``scale_down_order(snapshot, model, now, profile, instances=None) -> tuple[ScaleDownEntry, ...]``
- ``instance_from_decision(decision, instance_id, created_at=0.0) -> Instance``
- fast path for single-GPU candidates (no ``Candidate`` built): ``fit_gpus(snapshot, model, request,
  survivors, profile) -> GpuFit | None``, ``score_gpus(snapshot, model, fit, profile) -> Decision | None``;
  located once and rescored per replica: ``Positions``, ``still_fitting``, ``score_positions``
- ``Profile`` / ``ScorerConfig`` / ``DEFAULT_PROFILE`` / ``profile_from_json`` / ``profile_from_yaml``
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.core.placement.fastpath import Positions, score_positions, still_fitting
    from shared.core.placement.lifecycle import instance_from_decision
    from shared.core.placement.pipeline import (
        GpuFit,
        filter_rows,
        fit_gpus,
        place,
        requirements,
        run_filters,
        run_fitting,
        run_scoring,
        scale_down_order,
        score_gpus,
    )
    from shared.core.placement.profile import DEFAULT_PROFILE, Profile, ScorerConfig
    from shared.core.placement.registry import profile_from_json, profile_from_yaml, validate_profile
    from shared.core.placement.snapshot import ClusterSnapshot, SnapshotConfig

# name -> defining module: the package loads a module on first use of one of its names, so importing one
# light submodule (``domain`` for a CLI read) does not load the whole core and numpy with it.
_LAZY: dict[str, str] = {
    "Positions": "fastpath", "score_positions": "fastpath", "still_fitting": "fastpath",
    "instance_from_decision": "lifecycle",
    "GpuFit": "pipeline", "filter_rows": "pipeline", "fit_gpus": "pipeline", "place": "pipeline",
    "requirements": "pipeline",
    "run_filters": "pipeline", "run_fitting": "pipeline", "run_scoring": "pipeline",
    "scale_down_order": "pipeline", "score_gpus": "pipeline",
    "DEFAULT_PROFILE": "profile", "Profile": "profile", "ScorerConfig": "profile",
    "profile_from_json": "registry", "profile_from_yaml": "registry", "validate_profile": "registry",
    "ClusterSnapshot": "snapshot", "SnapshotConfig": "snapshot",
}


class _Package(types.ModuleType):
    """This package's module type: a submodule import never rebinds a public function of the same name.

    ``requirements`` is both a submodule and the pipeline's function exported here; importing the submodule
    binds it on the package, which eagerly importing the function used to overwrite again. The submodule
    stays reachable as ``shared.core.placement.requirements`` through ``sys.modules``.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_PROFILE",
    "ClusterSnapshot",
    "GpuFit",
    "Positions",
    "Profile",
    "ScorerConfig",
    "SnapshotConfig",
    "filter_rows",
    "fit_gpus",
    "instance_from_decision",
    "place",
    "profile_from_json",
    "profile_from_yaml",
    "requirements",
    "run_filters",
    "run_fitting",
    "run_scoring",
    "scale_down_order",
    "score_gpus",
    "score_positions",
    "still_fitting",
    "validate_profile",
]
