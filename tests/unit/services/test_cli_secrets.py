"""Every service command line refuses a URL carrying a user or secret (``ps`` shows it to every local user) in
one line, naming the environment variable the URL belongs in; the same URL from that variable is taken."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from services.engine_server.server import parse_args as engine_args
from services.gateway.__main__ import parse_args as gateway_args
from services.gateway.feed_relay import main as relay_main
from services.picker.__main__ import parse_args as picker_args
from services.workers.__main__ import parse as fleet_args
from shared.envsettings import credentials_on_command_line

SECRET_URL = "nats://someone:s3cret@127.0.0.1:4222"

REFUSING: list[tuple[str, Callable[[list[str]], object], list[str], str]] = [
    ("engine server", engine_args, ["--nats-url", SECRET_URL], "GANTRY_ENGINE_NATS_URL"),
    ("gateway, NATS", gateway_args, ["--eds-path", "e.json", "--nats-url", SECRET_URL], "GANTRY_NATS_URL"),
    ("gateway, Redis", gateway_args, ["--eds-path", "e.json", "--redis-url", "redis://u:p@127.0.0.1:6379/0"],
     "GANTRY_REDIS_URL"),
    ("picker", picker_args, ["--nats-url", SECRET_URL], "GANTRY_NATS_URL"),
    ("feed relay", relay_main, ["--nats-url", SECRET_URL], "GANTRY_FEED_RELAY_NATS_URL"),
    ("fleet", fleet_args, ["--engines", "--engine-nats-url", SECRET_URL], "GANTRY_ENGINE_NATS_URL"),
    # argparse takes --opt=value and an unambiguous abbreviation too: the check is on the parsed value
    ("picker, inline", picker_args, [f"--nats-url={SECRET_URL}"], "GANTRY_NATS_URL"),
    ("picker, abbreviated", picker_args, ["--nats-u", SECRET_URL], "GANTRY_NATS_URL"),
    ("gateway, abbreviated inline", gateway_args, ["--eds-path", "e.json", "--redis=redis://u:s3cret@h/0"],
     "GANTRY_REDIS_URL"),
    ("engine server, abbreviated", engine_args, ["--nats", SECRET_URL], "GANTRY_ENGINE_NATS_URL"),
]


@pytest.mark.parametrize(("name", "parse", "argv", "env"), REFUSING, ids=[r[0] for r in REFUSING])
def test_a_url_with_credentials_on_the_command_line_is_refused_in_one_line_naming_its_variable(
    name: str, parse: Callable[[list[str]], object], argv: list[str], env: str
) -> None:
    with pytest.raises(SystemExit) as refused:
        parse(argv)
    message = str(refused.value.code)
    assert refused.value.code != 0 and env in message and "\n" not in message
    assert "s3cret" not in message and ":p@" not in message


@pytest.mark.parametrize("url", ["nats://TOKEN@h:4222", "nats://u:p@h:4222", "redis://:p@h:6379/0"])
def test_a_user_alone_counts_as_a_credential_since_a_nats_token_is_written_as_one(url: str) -> None:
    assert credentials_on_command_line("--nats-url", url, "X") is not None


@pytest.mark.parametrize("url", [None, "", "nats://127.0.0.1:4222", "unix:///run/redis.sock"])
def test_a_url_without_credentials_is_accepted(url: str | None) -> None:
    assert credentials_on_command_line("--nats-url", url, "X") is None


def test_the_engine_server_takes_the_same_url_from_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GANTRY_ENGINE_NATS_URL", SECRET_URL)
    assert engine_args([]).nats_url == SECRET_URL


def test_the_picker_takes_its_url_from_the_environment_and_needs_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GANTRY_NATS_URL", SECRET_URL)
    assert picker_args([]).nats_url == SECRET_URL
    monkeypatch.delenv("GANTRY_NATS_URL")
    with pytest.raises(SystemExit):
        picker_args([])


@pytest.mark.parametrize("url", ["someone:s3cret@127.0.0.1:4222", "TOKEN@127.0.0.1"])
def test_a_url_without_a_scheme_is_read_as_the_nats_client_reads_it(url: str) -> None:
    # nats-py puts "nats://" in front of a URL without one, and then sends its user and secret
    assert credentials_on_command_line("--nats-url", url, "X") is not None


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0?password=s3cret", "unix:///run/redis.sock?password=s3cret",
                                 "redis://127.0.0.1:6379/0?username=u&password=s3cret"])
def test_a_secret_in_the_query_counts_as_a_credential_since_redis_py_reads_it_there(url: str) -> None:
    assert credentials_on_command_line("--redis-url", url, "X") is not None
