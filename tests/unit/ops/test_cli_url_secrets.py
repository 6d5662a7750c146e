"""The gantry CLI refuses a --nats-url/--redis-url holding a user or secret (``ps`` shows a command line to every
local user), as the services do: one line on stderr naming the variable the URL belongs in, a non-zero exit, before
any command runs; the same URL from that variable is taken."""

from __future__ import annotations

import pytest

from ops.cli.connect import connection_settings
from ops.cli.main import main, secret_on_command_line

SECRET_NATS = "nats://cli:s3cret@127.0.0.1:4222"

REFUSED = [
    (["models", "--nats-url", SECRET_NATS], "GANTRY_NATS_URL"),  # the read commands' fast path
    (["gateway", "--redis-url=redis://:s3cret@127.0.0.1:6379/0"], "GANTRY_REDIS_URL"),  # the Typer app
    (["scale", "m", "2", "--nats-url", "nats://s3cret@127.0.0.1:4222"], "GANTRY_NATS_URL"),  # a NATS token
]


@pytest.mark.parametrize(("argv", "env"), REFUSED, ids=["fast path", "typer app", "token"])
def test_a_url_with_credentials_on_the_command_line_is_refused_in_one_line_naming_its_variable(
        argv: list[str], env: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        main(argv)
    err = capsys.readouterr().err
    assert refused.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and f"${env}" in err
    assert "s3cret" not in err


@pytest.mark.parametrize("argv", [["models", "--nats-url", "nats://127.0.0.1:4222"], ["models", "--redis-url="],
                                  ["explain", "--", "--nats-url", SECRET_NATS], ["models", "--nats-url"]])
def test_a_url_without_credentials_or_not_an_option_is_left_to_the_command(argv: list[str]) -> None:
    assert secret_on_command_line(argv) is None


def test_the_same_url_from_its_variable_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GANTRY_NATS_URL", SECRET_NATS)
    assert connection_settings().nats_url == SECRET_NATS
