"""Settings read without pydantic (shared.envsettings, the CLI's fast path) agree with ``Settings``: the same fields,
defaults and bounds, the same value for every environment it accepts, and no answer (so ``Settings`` decides,
with its own error) for anything less plain."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

import annotated_types
import pydantic
import pytest

from shared.envsettings import FIELDS, EnvSettings, read, with_user, without_user
from shared.settings import Settings


@pytest.fixture(autouse=True)
def no_gantry_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets: the caller's GANTRY_* variables would change both sides."""
    for key in [k for k in os.environ if k.upper().startswith("GANTRY_")]:
        monkeypatch.delenv(key)


BOUNDS = {annotated_types.Gt: "gt", annotated_types.Ge: "ge", annotated_types.Le: "le"}


def settings_bounds(name: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for item in Settings.model_fields[name].metadata:
        for kind, key in BOUNDS.items():
            if isinstance(item, kind):
                found[key] = getattr(item, key)
    return found


def test_the_fields_are_settings_fields_with_the_same_defaults_types_and_bounds() -> None:
    assert list(FIELDS) == list(Settings.model_fields)
    for name, spec in FIELDS.items():
        theirs = Settings.model_fields[name]
        assert spec.default == theirs.default, name
        assert spec.type == theirs.annotation.__name__, name  # type: ignore[union-attr]
        assert dict(spec.metadata) == settings_bounds(name), name


def as_dict(settings: Settings | EnvSettings) -> dict[str, object]:
    return {name: getattr(settings, name) for name in FIELDS}


# environments read plainly: each must give exactly what Settings gives
PLAIN = [
    {},
    {"GANTRY_NATS_URL": "nats://10.0.0.1:4333", "GANTRY_REDIS_URL": "redis://r:6380/2"},
    {"GANTRY_NOT_READY_AFTER_S": "7.25", "GANTRY_MAX_DELIVER": "3", "GANTRY_WEB_PORT": "0"},
    {"GANTRY_DRAIN_TIMEOUT_S": "0", "GANTRY_METRICS_PORT": "65535", "GANTRY_FIT_CACHE_S": "0.000000001"},
    {"gantry_redis_url": "redis://lower:1/0", "Gantry_Profile": "mixed-case"},  # names are case-insensitive
    {"GANTRY_PROFILE": "", "GANTRY_IDENTITY": "", "GANTRY_HOME_IS_NOT_A_FIELD": "x", "OTHER": "y"},
    {"GANTRY_NATS_URL": "not a url at all"},  # any text is a text field's value
]


@pytest.mark.parametrize("env", PLAIN, ids=[",".join(e) or "empty" for e in PLAIN])
def test_a_plain_environment_gives_what_settings_gives(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    mine = read({})
    assert mine is not None
    assert as_dict(mine) == as_dict(Settings())


# values Settings may read differently or refuse: never accepted here
NOT_PLAIN = [
    ("GANTRY_NOT_READY_AFTER_S", "0"),  # out of bounds (gt 0): Settings' error
    ("GANTRY_NOT_READY_AFTER_S", "-1"),
    ("GANTRY_NOT_READY_AFTER_S", "nan"),
    ("GANTRY_NOT_READY_AFTER_S", "inf"),
    ("GANTRY_NOT_READY_AFTER_S", "1e3"),
    ("GANTRY_NOT_READY_AFTER_S", " 5"),
    ("GANTRY_NOT_READY_AFTER_S", ""),
    ("GANTRY_NOT_READY_AFTER_S", "5."),
    ("GANTRY_NOT_READY_AFTER_S", "9" * 400),
    ("GANTRY_MAX_DELIVER", "0"),
    ("GANTRY_MAX_DELIVER", "2.0"),
    ("GANTRY_MAX_DELIVER", "03"),
    ("GANTRY_MAX_DELIVER", "+3"),
    ("GANTRY_MAX_DELIVER", "1_000"),
    ("GANTRY_MAX_DELIVER", "٣"),  # a non-ASCII digit
    ("GANTRY_WEB_PORT", "65536"),
    ("GANTRY_BATCH_MAX", "many"),
]


@pytest.mark.parametrize("key,value", NOT_PLAIN, ids=[f"{k}={v[:12]!r}" for k, v in NOT_PLAIN])
def test_a_value_that_is_not_plain_is_left_to_settings(key: str, value: str) -> None:
    assert read({}, {key: value}) is None


def test_a_field_spelt_in_two_cases_is_left_to_settings() -> None:
    assert read({}, {"GANTRY_PROFILE": "a", "gantry_profile": "b"}) is None


def test_an_override_wins_over_the_environment_and_its_bad_value_is_not_read() -> None:
    got = read({"redis_url": "redis://flag:1/0"}, {"GANTRY_REDIS_URL": "redis://env:1/0"})
    assert got is not None and got.redis_url == "redis://flag:1/0"
    # an environment value that an override shadows is not judged (pydantic-settings never validates it either)
    got = read({"not_ready_after_s": 3.0}, {"GANTRY_NOT_READY_AFTER_S": "nope"})
    assert got is not None and got.not_ready_after_s == 3.0


def test_the_identity_gets_its_secret_from_the_credentials_file_as_settings_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "credentials.json"
    creds.write_text(json.dumps({"identities": {"cli": "s3cret"}}))
    env = {"GANTRY_IDENTITY": "cli", "GANTRY_CREDENTIALS_FILE": str(creds),
           "GANTRY_NATS_URL": "nats://h:4222", "GANTRY_REDIS_URL": "redis://already:pw@h:6379/0"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    mine = read({})
    assert mine is not None
    assert mine.nats_url == "nats://cli:s3cret@h:4222" and mine.redis_url == "redis://already:pw@h:6379/0"
    assert as_dict(mine) == as_dict(Settings())


def test_a_url_settings_refuses_is_left_to_settings(tmp_path: Path) -> None:
    creds = tmp_path / "credentials.json"
    creds.write_text(json.dumps({"identities": {"cli": "s3cret"}}))
    env = {"GANTRY_CREDENTIALS_FILE": str(creds), "GANTRY_REDIS_URL": "redis://h:99999/0"}
    assert read({"identity": "cli"}, env) is None  # Settings: "Port out of range 0-65535"


def test_the_settings_are_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        EnvSettings().nats_url = "x"  # type: ignore[misc]


@pytest.mark.parametrize("secret", ["p@ss:w/rd#1?%", "plain-Secret_0"])
def test_a_secret_put_into_a_url_keeps_its_host_and_decodes_back_to_itself(secret: str) -> None:
    url = with_user("redis://[::1]:6379/0", "gateway", secret)
    parts = urlsplit(url)
    assert (parts.hostname, parts.port, parts.path) == ("::1", 6379, "/0")
    assert (parts.username, unquote(parts.password or "")) == ("gateway", secret)
    assert without_user(url) == "redis://[::1]:6379/0"
    assert with_user("nats://x:y@h:4222", "gateway", secret) == "nats://x:y@h:4222"  # names a user already


def test_a_generated_secret_goes_into_the_url_as_it_is() -> None:
    assert with_user("nats://h:4222", "engine_server", "Ab-_9") == "nats://engine_server:Ab-_9@h:4222"


@pytest.mark.parametrize("url", ["redis://h:6379/abc", "rediss://h/0x1", "redis://h/1/2", "redis://h/%41",
                                 "redis://h/" + "1" * 5000, "redis://h/5?db=0", "redis://h/5?db=&db=3",
                                 "REDIS://h/gantry"])
def test_a_redis_database_that_is_not_a_number_is_refused_not_read_as_database_0(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # redis-py takes any non-numeric path as database 0: the state would land beside whatever lives there
    assert read({}, {"GANTRY_REDIS_URL": url}) is None  # left to Settings, which says why
    monkeypatch.setenv("GANTRY_REDIS_URL", url)
    with pytest.raises(ValueError, match=r"the database .* must be a number|the URL names two databases"):
        Settings()


@pytest.mark.parametrize("url", ["redis://h:6379/0", "redis://h", "redis://h/", "rediss://h/15",
                                 "redis://h/%31", "unix:///run/redis.sock?db=2", "redis://h/3?db=3", "redis://h?db=4"])
def test_a_numbered_or_absent_redis_database_is_accepted(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = read({}, {"GANTRY_REDIS_URL": url})
    assert mine is not None and mine.redis_url == url
    monkeypatch.setenv("GANTRY_REDIS_URL", url)
    assert Settings().redis_url == url


@pytest.mark.parametrize("url", ["redis://[::1", "redis://[zz]/0", "nats://[::1", "nats://[nothost]:4222"])
def test_a_url_that_does_not_parse_is_an_error_line_never_a_traceback_and_never_shown(
        url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.envsettings import credentials_on_command_line, redis_url_problem

    said = credentials_on_command_line("--nats-url", url, "GANTRY_NATS_URL")
    assert said is not None and said.startswith("--nats-url: not a valid URL") and "\n" not in said
    if url.startswith("redis"):
        assert (problem := redis_url_problem(url)) is not None and problem.startswith("not a valid URL")
    assert without_user(url.replace("//", "//u:secret@")) == "(a URL that does not parse)"


@pytest.mark.parametrize("field", ["nats_url", "redis_url"])
def test_a_port_out_of_range_is_the_error_of_its_setting_with_or_without_credentials(
        field: str, tmp_path: Path) -> None:
    from pydantic import ValidationError

    from shared.settings import setting_error

    creds = tmp_path / "credentials.json"
    creds.write_text(json.dumps({"identities": {"cli": "s3cret"}}))
    for identity in ("cli", ""):  # with a secret to add, the port was met there: "invalid settings: Port ..."
        with pytest.raises(ValidationError) as err:
            Settings(**{field: "x://h:99999/0", "identity": identity, "credentials_file": str(creds)})
        assert setting_error(err.value) == f"invalid setting GANTRY_{field.upper()}: Port out of range 0-65535"


@pytest.mark.parametrize("value", [0, 1023, (1 << 36) + 1, 10**30, -1])
def test_a_pipeline_stream_size_out_of_bounds_is_refused_by_settings(value: int) -> None:
    with pytest.raises(pydantic.ValidationError, match="pipe_max_bytes"):
        Settings(pipe_max_bytes=value)
