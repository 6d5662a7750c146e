"""Profiles: plugin chains and weights as data (JSON/YAML), validated against the registries."""

from __future__ import annotations

import pytest

from shared.core.placement.filters import FILTERS
from shared.core.placement.fitting import FIT_STRATEGIES
from shared.core.placement.profile import DEFAULT_PROFILE, ScorerConfig
from shared.core.placement.registry import profile_from_json, profile_from_yaml, validate_profile
from shared.core.placement.scaledown import SCALE_DOWN_SCORERS
from shared.core.placement.scorers import SCORERS


def test_default_profile_enables_the_spec_chains_in_order():
    assert validate_profile(DEFAULT_PROFILE) is DEFAULT_PROFILE
    assert DEFAULT_PROFILE.filters == ("cluster", "gpu_selector", "labels", "status", "backend", "local_path")
    assert DEFAULT_PROFILE.fit_strategies[0] == "manual" and DEFAULT_PROFILE.fit_strategies[-1] == "cpu_only"


def test_every_registered_plugin_is_named_after_its_registry_key():
    for registry in (FILTERS, FIT_STRATEGIES, SCORERS, SCALE_DOWN_SCORERS):
        for name, cls in registry.items():
            assert cls.name == name


def test_yaml_profile_loads_with_weights():
    profile = profile_from_yaml(
        "name: packed\nscorers:\n  - name: binpack\n    weight: 2\n  - {name: locality, max_score: 20}\n"
    )
    assert profile.scorers == (ScorerConfig(name="binpack", weight=2.0), ScorerConfig(name="locality", max_score=20.0))
    assert profile.filters == DEFAULT_PROFILE.filters


def test_json_profile_loads():
    assert profile_from_json(b'{"name": "x", "fit_strategies": ["single_gpu"]}').fit_strategies == ("single_gpu",)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"filters": ["cluster", "nope"]}', "unknown filter 'nope'"),
        ('{"scorers": [{"name": "magic"}]}', "unknown scorer 'magic'"),
        ('{"max_worker_combinations": 0}', "at least 1"),
        ('{"scorers": [{"weight": 1}]}', "invalid profile"),
        ("{", "not valid JSON"),
        # a weight or maximum that is no number to multiply by: numpy's argmin of nothing, or an overflow warning
        ('{"scorers": [{"name": "placement", "weight": 1e308}]}', "scorers[0].weight"),
        ('{"scorers": [{"name": "placement", "max_score": 0}]}', "scorers[0].max_score"),
        ('{"scale_down_scorers": [{"name": "placement", "weight": -1e9}]}', "scale_down_scorers[0].weight"),
        # a misspelt key was dropped and the defaults ran, as a spec file's would not be
        ('{"scorer": [{"name": "placement"}]}', "unknown field `scorer`"),
        ('{"scorers": [{"name": "placement", "wieght": 5}]}', "unknown field `wieght`"),
    ],
)
def test_bad_profiles_are_rejected_with_one_line(text, fragment):
    with pytest.raises(ValueError, match=None) as err:
        profile_from_json(text)
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"scorers": [{"name": "binpack", "args": {"cpu_wieght": 1}}]}',
         "scorer 'binpack': invalid args: Object contains unknown field `cpu_wieght`"),
        ('{"scorers": [{"name": "binpack", "args": {"cpu_weight": "lots"}}]}',
         "scorer 'binpack': invalid args: Expected `float`, got `str` - at `$.cpu_weight`"),
        ('{"scorers": [{"name": "binpack", "args": {"cpu_weight": -1}}]}', "Expected `float` >= 0.0"),
        ('{"scorers": [{"name": "fragmentation", "args": {"window": 0}}]}', "scorer 'fragmentation': invalid args"),
        ('{"scorers": [{"name": "locality", "args": {"anything": 1}}]}', "scorer 'locality': invalid args"),
        ('{"filter_args": {"labels": {"x": 1}}}', "filter 'labels': invalid args"),
        ('{"fit_args": {"single_gpu": {"x": 1}}}', "fit strategy 'single_gpu': invalid args"),
        ('{"filters": ["cluster"], "filter_args": {"status": {}}}', "args for filter 'status', which the profile"),
        ('{"scale_down_scorers": [{"name": "status", "args": {"x": 1}}]}', "scale-down scorer 'status': invalid"),
    ],
)
def test_plugin_args_are_typed_and_checked_when_the_profile_loads(text, fragment):
    with pytest.raises(ValueError) as err:
        profile_from_json(text)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_every_plugin_declares_typed_args_that_default_cleanly():
    for registry in (FILTERS, FIT_STRATEGIES, SCORERS, SCALE_DOWN_SCORERS):
        for plugin in registry.values():
            assert plugin.configured().args == plugin.Args()


def test_valid_plugin_args_load_and_reach_the_plugin():
    profile = profile_from_yaml(b"scorers:\n  - name: binpack\n    args: {cpu_weight: 2.5}\n"
                                b"  - name: fragmentation\n    args: {window: 64}\n")
    binpack, fragmentation = (SCORERS[s.name].configured(s.args) for s in profile.scorers)
    assert binpack.args.cpu_weight == 2.5  # type: ignore[attr-defined]
    assert fragmentation.args.window == 64  # type: ignore[attr-defined]


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -float("inf"), 1e7])
def test_a_profile_built_in_python_with_a_weight_that_is_no_number_is_refused(weight):
    from shared.core.placement.profile import Profile, ScorerConfig
    from shared.core.placement.registry import validate_profile

    with pytest.raises(ValueError, match="must be finite"):
        validate_profile(Profile(scorers=(ScorerConfig(name="placement", weight=weight),)))
