"""Placement profiles: which filters, fit strategies and scorers run, in which order, with which weights.

A profile is plain data (JSON or YAML); plugin names refer to the registries in ``filters``, ``fitting``,
``scorers`` and ``scaledown``. Plugin parameters are typed (each plugin's ``Args`` struct): scorers take
``args`` in their ``ScorerConfig``, filters and fit strategies in ``filter_args`` / ``fit_args`` by name.
This module holds the data only, so plugins may read a profile without importing the registries;
``registry`` loads a profile and checks names and arguments against them.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

MAX_WEIGHT = 1e6
"""A scorer's weight and rescaled maximum lie within this (NaN, infinities and overflowing products are refused)."""
Weight = Annotated[float, msgspec.Meta(ge=-MAX_WEIGHT, le=MAX_WEIGHT)]
MaxScore = Annotated[float, msgspec.Meta(gt=0, le=MAX_WEIGHT)]


class ScorerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One enabled scorer: its contribution is ``raw × weight``, rescaled to ``max_score`` when set."""

    name: str
    weight: Weight = 1.0
    max_score: MaxScore | None = None  # rescale the scorer's natural maximum to this value
    args: dict[str, Any] = {}  # the scorer's typed parameters (its ``Args`` struct), checked on load


DEFAULT_FILTERS: tuple[str, ...] = ("cluster", "gpu_selector", "labels", "status", "backend", "local_path")
DEFAULT_FIT_STRATEGIES: tuple[str, ...] = (
    "manual",
    "single_gpu",
    "multi_gpu",
    "multi_worker",
    "partial_offload",
    "cpu_only",
)
DEFAULT_SCORERS: tuple[ScorerConfig, ...] = (
    ScorerConfig(name="placement"),
    ScorerConfig(name="locality"),
    ScorerConfig(name="worker_fill"),
)
DEFAULT_SCALE_DOWN: tuple[ScorerConfig, ...] = (
    ScorerConfig(name="status"),
    ScorerConfig(name="offload_layers"),
    ScorerConfig(name="placement"),
)
# Which device vendors each backend runs on ("cpu": workers without GPUs, or with CPU offloading).
DEFAULT_BACKEND_SUPPORT: dict[str, tuple[str, ...]] = {
    "vllm": ("cuda", "rocm"),
    "sglang": ("cuda", "rocm"),
    "llama-cpp": ("cuda", "rocm", "metal", "cpu"),
    "custom": ("cuda", "rocm", "metal", "cpu"),
}


class Profile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The plugin chains placement runs, and their settings."""

    name: str = "default"
    filters: tuple[str, ...] = DEFAULT_FILTERS
    fit_strategies: tuple[str, ...] = DEFAULT_FIT_STRATEGIES
    scorers: tuple[ScorerConfig, ...] = DEFAULT_SCORERS
    scale_down_scorers: tuple[ScorerConfig, ...] = DEFAULT_SCALE_DOWN
    backend_support: dict[str, tuple[str, ...]] = msgspec.field(
        default_factory=lambda: dict(DEFAULT_BACKEND_SUPPORT)
    )
    max_worker_combinations: int = 64  # multi-worker candidates kept per GPU group, in name order
    # backend → vendor → lowest GPU runtime version it runs on (e.g. {"vllm": {"cuda": "12.1"}})
    min_runtime_version: dict[str, dict[str, str]] = {}
    filter_args: dict[str, dict[str, Any]] = {}  # filter name → its typed parameters
    fit_args: dict[str, dict[str, Any]] = {}  # fit strategy name → its typed parameters


DEFAULT_PROFILE = Profile()
