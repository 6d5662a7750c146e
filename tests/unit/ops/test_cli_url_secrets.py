"""The gantry CLI refuses a --nats-url/--redis-url holding a user or secret (``ps`` shows a command line to every
local user), as the services do: one line on stderr naming the variable the URL belongs in, a non-zero exit, before
any command runs; the same URL from that variable is taken."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ops.cli.connect import connection_settings
from ops.cli.errors import CliError
from ops.cli.main import main, secret_on_command_line, url_flag

SECRET_NATS = "nats://cli:s3cret@127.0.0.1:4222"

REFUSED = [
    ("fast path", ["models", "--nats-url", SECRET_NATS], "GANTRY_NATS_URL"),
    ("typer app, inline value", ["gateway", "--redis-url=redis://:s3cret@127.0.0.1:6379/0"], "GANTRY_REDIS_URL"),
    ("a NATS token", ["scale", "m", "2", "--nats-url", "nats://s3cret@127.0.0.1:4222"], "GANTRY_NATS_URL"),
    ("no scheme", ["workers", "--nats-url=cli:s3cret@127.0.0.1:4222"], "GANTRY_NATS_URL"),
    ("secret in the query", ["status", "--redis-url", "redis://127.0.0.1:6379/0?password=s3cret"],
     "GANTRY_REDIS_URL"),
    ("second of a repeated option", ["models", "--nats-url", "nats://127.0.0.1:4222", "--nats-url", SECRET_NATS],
     "GANTRY_NATS_URL"),
    # click takes this `--` as --model's value, and then --nats-url as an option
    ("-- as an option's value", ["instances", "--model", "--", f"--nats-url={SECRET_NATS}"], "GANTRY_NATS_URL"),
    ("after a real --", ["explain", "--", "--nats-url", SECRET_NATS], "GANTRY_NATS_URL"),
    ("inline after a real --", ["deploy", "--", f"--nats-url={SECRET_NATS}"], "GANTRY_NATS_URL"),
    ("abbreviation", ["models", "--nats-u", SECRET_NATS], "GANTRY_NATS_URL"),
    ("abbreviation, inline", ["scale", "m", "2", "--redis=redis://:s3cret@127.0.0.1:6379/0"], "GANTRY_REDIS_URL"),
]


@pytest.mark.parametrize(("argv", "env"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_a_url_with_credentials_on_the_command_line_is_refused_in_one_line_naming_its_variable(
        argv: list[str], env: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        main(argv)
    err = capsys.readouterr().err
    assert refused.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and f"${env}" in err
    assert "s3cret" not in err


LEFT_TO_THE_COMMAND = [
    ("no credentials", ["models", "--nats-url", "nats://127.0.0.1:4222"]),
    ("empty inline value", ["models", "--redis-url="]),
    ("flag without a value", ["models", "--nats-url"]),
    ("a prefix of both flags", ["models", "--", SECRET_NATS]),
    ("another option's value", ["up", "--gpu-type", SECRET_NATS]),
    ("a positional argument", ["deploy", SECRET_NATS]),
]


@pytest.mark.parametrize("argv", [r[1] for r in LEFT_TO_THE_COMMAND], ids=[r[0] for r in LEFT_TO_THE_COMMAND])
def test_a_url_without_credentials_or_not_given_to_a_url_option_is_left_to_the_command(argv: list[str]) -> None:
    assert secret_on_command_line(argv) is None


@pytest.mark.parametrize(("flag", "meant"), [("--nats-url", "--nats-url"), ("--nats", "--nats-url"),
                                             ("--n", "--nats-url"), ("--redis-u", "--redis-url"), ("--", None),
                                             ("--nats-url-x", None), ("-n", None), ("--json", None)])
def test_a_url_flag_is_named_in_full_or_by_a_prefix_only_it_has(flag: str, meant: str | None) -> None:
    assert url_flag(flag) == meant


@pytest.mark.parametrize(("nats_url", "redis_url"), [(SECRET_NATS, None), (None, "redis://u:s3cret@127.0.0.1/0")])
def test_a_url_with_credentials_that_reaches_a_command_as_an_option_value_is_refused_there_too(
        nats_url: str | None, redis_url: str | None) -> None:
    # the second line of defence: whatever form click took the option in, the value a command gets is checked
    with pytest.raises(CliError) as refused:
        connection_settings(nats_url, redis_url)
    assert refused.value.exit_code == 2 and "s3cret" not in str(refused.value)


def test_the_same_url_from_its_variable_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GANTRY_NATS_URL", SECRET_NATS)
    assert connection_settings().nats_url == SECRET_NATS


BAD_PORTS = [
    (["models", "--redis-url", "redis://127.0.0.1:99999/0"], {}, "invalid --redis-url: Port out of range 0-65535"),
    (["scale", "m", "1", "--nats-url", "nats://127.0.0.1:99999"], {}, "invalid --nats-url: Port out of range 0-65535"),
    (["events", "--nats-url=127.0.0.1:99999"], {}, "invalid --nats-url: Port out of range 0-65535"),
    (["workers"], {"GANTRY_REDIS_URL": "redis://cli:s3cret@127.0.0.1:99999/0"},
     "invalid setting GANTRY_REDIS_URL: Port out of range 0-65535"),
    (["events"], {"GANTRY_NATS_URL": "nats://s3cret@127.0.0.1:4z22"},
     "invalid setting GANTRY_NATS_URL: Port is not a number (a user or secret holding '/', '?' or '#' must be "
     "percent-encoded)"),
    # a '/' ends the URL's host part inside the secret: urllib took its first piece for the port and said so
    (["events"], {"GANTRY_NATS_URL": "nats://cli:s3cret/x@127.0.0.1:4222"},
     "invalid setting GANTRY_NATS_URL: Port is not a number (a user or secret holding '/', '?' or '#' must be "
     "percent-encoded)"),
    (["workers"], {"GANTRY_REDIS_URL": "redis://:s3cret?x@127.0.0.1:6379/0"},
     "invalid setting GANTRY_REDIS_URL: Port is not a number (a user or secret holding '/', '?' or '#' must be "
     "percent-encoded)"),
    (["events"], {"GANTRY_NATS_URL": "nats://cli:s3cret#x@127.0.0.1:4222"},
     "invalid setting GANTRY_NATS_URL: Port is not a number (a user or secret holding '/', '?' or '#' must be "
     "percent-encoded)"),
]


@pytest.mark.parametrize("credentials", [True, False], ids=["after gantry up", "no credentials"])
@pytest.mark.parametrize(("argv", "env", "says"), BAD_PORTS, ids=[" ".join(a) for a, _, _ in BAD_PORTS])
def test_a_url_whose_port_is_no_port_is_refused_naming_its_flag_or_variable(
        argv: list[str], env: dict[str, str], says: str, credentials: bool, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Not "invalid settings: Port out of range" (the credentials `gantry up` writes met the port first) nor
    "invalid Redis URL ...": the flag or the variable to fix, and never the secret the URL holds."""
    monkeypatch.setenv("GANTRY_HOME", str(tmp_path))
    if credentials:
        (tmp_path / "credentials.json").write_text(json.dumps({"identities": {"cli": "s3cret"}}))
    monkeypatch.setenv("GANTRY_NATS_URL", "nats://127.0.0.1:1")
    monkeypatch.setenv("GANTRY_REDIS_URL", "redis://127.0.0.1:2/0")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as refused:
        main(argv)
    err = capsys.readouterr().err
    assert refused.value.code == 2 and err == f"error: {says}\n"
    assert "s3cret" not in err
