"""Router configuration (YAML/JSON) and scheduling profiles.

A configuration declares plugin instances (type, name, typed parameters), profiles that reference them
with weights, the profile handler, optional shadow profiles, the data layer, admission and flow
control. It mirrors GIE's ``EndpointPickerConfig`` (``plugins`` + ``schedulingProfiles``) and its
defaulting (``pkg/epp/config/loader/defaults.go``): a plugin's name defaults to its type, a scorer
without weight gets 1, a profile without picker gets ``max-score-picker``. Everything is validated when
the configuration loads; the error names the plugin and the field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import msgspec
import numpy as np
import numpy.typing as npt

from shared.core import strict_yaml
from shared.core.routing.cycle import Cycle
from shared.core.routing.domain import EndpointState, FilterReport, ProfileResult
from shared.core.routing.filters import FILTERS
from shared.core.routing.pickers import PICKERS
from shared.core.routing.plugin import Filter, Picker, Plugin, Scorer
from shared.core.routing.saturation import DetectorConfig
from shared.core.routing.scorers import SCORERS


class PluginSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One plugin instance: its registered ``type``, a ``name`` to reference it, its ``parameters``."""

    type: str
    name: str = ""
    parameters: dict[str, Any] = {}


class PluginRef(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A plugin used by a profile; ``weight`` applies to scorers (un-normalised, GIE style)."""

    ref: str
    weight: float = 1.0


class ProfileSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A scheduling profile: filters in order, weighted scorers, one picker."""

    name: str
    plugins: tuple[PluginRef, ...]


class HandlerSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The profile handler: ``single`` (one profile) or ``pd`` (decode always, prefill when worth it)."""

    type: Literal["single", "pd"] = "single"
    parameters: dict[str, Any] = {}


class DataSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The data layer (see ``state.DataConfig``)."""

    block_size: int = 16
    max_prefix_blocks: int = 8192
    approx_capacity: int = 31_250
    speculative_capacity: int = 8192
    precise_slack: float = 1.25
    staleness_s: float = 0.2
    hash_memo_chunks: int = 2048


class AdmissionSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Admission: shed sheddable traffic (priority < 0) with 429 when pool saturation >= 1."""

    shed_sheddable: bool = True
    detector: DetectorConfig = DetectorConfig()


class FlowControlSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Flow control (see ``flow_control``): off unless ``enabled``."""

    enabled: bool = False
    max_queued: int = 10_000
    max_queued_per_band: int = 5_000
    ttl_s: float = 900.0
    ordering: Literal["fcfs", "edf"] = "fcfs"
    fairness: Literal["round-robin", "global-strict"] = "round-robin"
    # dispatch gate beside the detector: in-flight requests per endpoint (GIE's flow-control guide: about
    # 110% of the engine's batch capacity, 256 sequences in vLLM)
    max_inflight_per_endpoint: int = 280


class RouterConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything one router runs."""

    name: str = "default"
    plugins: tuple[PluginSpec, ...]
    profiles: tuple[ProfileSpec, ...] = ()
    handler: HandlerSpec = HandlerSpec()
    shadow: tuple[str, ...] = ()
    data: DataSpec = DataSpec()
    admission: AdmissionSpec = AdmissionSpec()
    flow_control: FlowControlSpec = FlowControlSpec()


class Profile:
    """A built profile: filter chain, weighted scorers and a picker, run against one cycle."""

    def __init__(self, name: str, filters: list[Filter], scorers: list[tuple[Scorer, float]], picker: Picker) -> None:
        self.name = name
        self.filters = filters
        self.scorers = scorers
        self.picker = picker
        # the plugins that learn from decisions (override ``picked``): the commit calls only these
        self.learners = [p for p in self.plugins if type(p).picked is not Plugin.picked]

    @property
    def plugins(self) -> list[Plugin]:
        """Every plugin of the profile."""
        return [*self.filters, *(s for s, _ in self.scorers), self.picker]

    def run(self, cycle: Cycle, cands: list[EndpointState], explain: bool = False) -> ProfileResult:
        """Filter, score (each clamped to [0, 1], times its weight), pick. Never empty without a reason."""
        reports: list[FilterReport] = []
        for f in self.filters:
            kept = f.filter(cycle, cands)
            if len(kept) != len(cands):
                if explain or not kept:
                    keep = {id(st) for st in kept}
                    dropped = tuple(st.id for st in cands if id(st) not in keep)
                    reports.append(FilterReport(f.name, dropped, f.why(cycle)))
                if not kept:
                    return ProfileResult(self.name, (), reports=tuple(reports),
                                         refusal=f"{f.name}: every endpoint dropped ({f.why(cycle)})",
                                         code=f.refusal_code)
                cands = kept
        totals = self.combine(cycle, cands)
        order = self.picker.pick(cycle, cands, totals)
        if not order:
            return ProfileResult(self.name, (), reports=tuple(reports), refusal=f"{self.picker.name}: picked nothing",
                                 code=503)
        ids = tuple(cands[i].id for i in order)
        scores = tuple(float(totals[i]) for i in order)
        if explain:
            return ProfileResult(self.name, ids, scores, tuple(reports),
                                 all_scores=dict(zip([st.id for st in cands], totals.tolist(), strict=True)))
        return ProfileResult(self.name, ids, scores)

    def combine(self, cycle: Cycle, cands: list[EndpointState]) -> npt.NDArray[np.float64]:
        """Σ weight × score per candidate, each score clamped to [0, 1] (NaN counts 0), scorers in profile order.

        Float arrays: every candidate's total is the same sum, in the same order, as the scalar formula."""
        n = len(cands)
        totals: npt.NDArray[np.float64] | None = None
        if n:
            for scorer, w in self.scorers:
                raw = scorer.score(cycle, cands)
                if raw is None:
                    continue
                if len(raw) != n:
                    raise ValueError(f"scorer {scorer.name!r} returned {len(raw)} scores for {n} endpoints")
                v = np.asarray(raw, dtype=np.float64)
                # (argmin/argmax: the reductions without min()/max()'s overhead; both land on a NaN, which fails both)
                if not scorer.bounded and not (v[v.argmin()] >= 0.0 and v[v.argmax()] <= 1.0):
                    v = np.where(v > 1.0, 1.0, np.where(v >= 0.0, v, 0.0))
                if totals is None:
                    totals = v * w  # a new array: the scorer's own (perhaps a pool column) is never written
                else:
                    totals += v if w == 1.0 else v * w  # (x × 1.0 is x exactly: one temporary fewer)
        return totals if totals is not None else np.zeros(n)


def _convert_params(spec: PluginSpec, cls: type[Plugin]) -> tuple[msgspec.Struct | None, list[str]]:
    try:
        params = msgspec.convert(spec.parameters, cls.Params)
    except msgspec.ValidationError as err:
        return None, [f"plugin {spec.name or spec.type!r} ({spec.type}): {err}"]
    return params, [f"plugin {spec.name or spec.type!r} ({spec.type}): {p}" for p in cls.check(params)]


REGISTRY: dict[str, type[Plugin]] = {**FILTERS, **SCORERS, **PICKERS}


def build_plugins(config: RouterConfig) -> tuple[dict[str, Plugin], list[str]]:
    """Instantiate every declared plugin; returns them by name and the problems found."""
    out: dict[str, Plugin] = {}
    problems: list[str] = []
    for spec in config.plugins:
        name = spec.name or spec.type
        cls = REGISTRY.get(spec.type)
        if cls is None:
            problems.append(f"plugin {name!r}: unknown type {spec.type!r} (known: {', '.join(sorted(REGISTRY))})")
            continue
        if name in out:
            problems.append(f"plugin name {name!r} declared twice")
            continue
        params, errs = _convert_params(spec, cls)
        problems += errs
        if params is not None and not errs:
            out[name] = cls(name, params)
    return out, problems


def build_profiles(config: RouterConfig, plugins: dict[str, Plugin]) -> tuple[dict[str, Profile], list[str]]:
    """Profiles from their specs (GIE defaulting: no profiles → one ``default`` with every plugin)."""
    problems: list[str] = []
    specs: Sequence[ProfileSpec] = config.profiles or (
        ProfileSpec(name="default", plugins=tuple(PluginRef(ref=n) for n in plugins)),
    )
    profiles: dict[str, Profile] = {}
    for spec in specs:
        filters: list[Filter] = []
        scorers: list[tuple[Scorer, float]] = []
        pickers: list[Picker] = []
        for ref in spec.plugins:
            plugin = plugins.get(ref.ref)
            if plugin is None:
                problems.append(f"profile {spec.name!r}: no plugin named {ref.ref!r}")
            elif isinstance(plugin, Filter):
                filters.append(plugin)
            elif isinstance(plugin, Scorer):
                if not 0 <= ref.weight < math.inf:  # inf × a score of 0 is NaN, which would win the max
                    problems.append(f"profile {spec.name!r}: weight of {ref.ref!r} must be finite and >= 0 "
                                    f"(got {ref.weight})")
                scorers.append((plugin, ref.weight))
            elif isinstance(plugin, Picker):
                pickers.append(plugin)
        if len(pickers) > 1:
            problems.append(f"profile {spec.name!r}: one picker allowed, got {', '.join(p.name for p in pickers)}")
        picker = pickers[0] if pickers else PICKERS["max-score-picker"]("max-score-picker",
                                                                         PICKERS["max-score-picker"].Params())
        if spec.name in profiles:
            problems.append(f"profile {spec.name!r} declared twice")
        profiles[spec.name] = Profile(spec.name, filters, scorers, picker)
    return profiles, problems


def decode_config(data: bytes | str, fmt: Literal["yaml", "json"] = "yaml") -> RouterConfig:
    """Parse a router configuration; raises ValueError with one clear message on bad input."""
    decode = strict_yaml.decode if fmt == "yaml" else msgspec.json.decode
    try:
        return decode(data, type=RouterConfig)
    except msgspec.ValidationError as err:
        raise ValueError(f"invalid router config: {err}") from None
    except msgspec.DecodeError as err:
        raise ValueError(f"router config is not valid {fmt.upper()}: {' '.join(str(err).split())}") from None
