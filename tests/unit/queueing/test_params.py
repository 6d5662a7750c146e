"""Broker parameters: the seed's names, explicit units, every problem named."""

from __future__ import annotations

import pytest

from shared.core.queueing import ParamError, SchedulerParams, parse_duration


def test_defaults_follow_the_seed_table_in_seconds() -> None:
    p = SchedulerParams()
    assert (p.name, p.max_size, p.ttl_s, p.topic, p.min_load_score, p.load_shards_num) == (
        "local", -1, 900.0, "default", 3.0, 1)
    assert p.sync_period_s == 5.0 and p.expire_period_s == 15.0 and p.release_load_expire_period_s == 600.0
    assert p.problems() == []


@pytest.mark.parametrize(("value", "seconds"), [
    (5, 5.0), (2.5, 2.5), ("5", 5.0), ("5s", 5.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0), (" 3 s ", 3.0),
    ("1e-3s", 0.001),
])
def test_durations_are_seconds_unless_a_unit_says_otherwise(value: object, seconds: float) -> None:
    assert parse_duration("scheduler_ttl", value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [0, -1, "0ms", "abc", "5 parsecs", True, None, float("nan"), float("inf"), [5]])
def test_bad_durations_are_refused_naming_the_parameter(value: object) -> None:
    with pytest.raises(ParamError, match="scheduler_ttl"):
        parse_duration("scheduler_ttl", value)


def test_from_mapping_reads_the_seed_names() -> None:
    p = SchedulerParams.from_mapping({
        "scheduler_name": "global", "scheduler_max_size": "10", "scheduler_ttl": "30s",
        "scheduler_topic": "llama", "scheduler_min_load_score": 2, "scheduler_load_shards_num": 4,
        "scheduler_sync_period": "500ms", "scheduler_expire_period": 3,
    })
    assert (p.name, p.max_size, p.ttl_s, p.topic, p.min_load_score, p.load_shards_num) == (
        "global", 10, 30.0, "llama", 2.0, 4)
    assert (p.sync_period_s, p.expire_period_s) == (0.5, 3.0)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ParamError) as err:
        SchedulerParams.from_mapping({"scheduler_name": "fancy", "scheduler_max_size": 0, "scheduler_bogus": 1,
                                      "scheduler_port": "x"})
    text = str(err.value)
    assert "unknown parameter 'scheduler_bogus'" in text
    assert "scheduler_port must be an integer" in text


@pytest.mark.parametrize(("raw", "needle"), [
    ({"scheduler_name": "fancy"}, "scheduler_name must be one of local, global, splitwise"),
    ({"scheduler_max_size": 0}, "scheduler_max_size must be -1"),
    ({"scheduler_max_size": -5}, "scheduler_max_size must be -1"),
    ({"scheduler_min_load_score": 0.5}, "scheduler_min_load_score must be >= 1"),
    ({"scheduler_load_shards_num": 0}, "scheduler_load_shards_num must be >= 1"),
    ({"scheduler_sync_period": 5, "scheduler_expire_period": 6}, "must be >= 2 x scheduler_sync_period"),
    ({"scheduler_topic": "a b"}, "scheduler_topic"),
    ({"scheduler_topic": "a*"}, "scheduler_topic"),
    ({"scheduler_port": 70000}, "scheduler_port"),
    ({"scheduler_max_size": True}, "scheduler_max_size must be int, got a boolean"),
    ({"scheduler_reader_batch_size": -1}, "scheduler_reader_batch_size must be >= 1"),
])
def test_invalid_values_are_refused_clearly(raw: dict[str, object], needle: str) -> None:
    with pytest.raises(ParamError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        SchedulerParams.from_mapping(raw)


def test_a_directly_built_bad_config_is_refused_by_checked() -> None:
    with pytest.raises(ParamError, match="scheduler_ttl"):
        SchedulerParams(ttl_s=-1).checked()
