"""Connection settings, fail-fast connections and output helpers of the CLI, without typer.

Connection settings come from flags first, then ``GANTRY_*`` environment variables (the same settings the
services read), then the defaults that ``gantry up`` listens on. Connections use a short timeout and no
reconnect loop, so a stopped stack is reported in one line instead of a hang or a traceback.

Nothing here imports typer, pydantic or rich at module level: the read commands' fast path (``ops.cli.fast``)
runs on this module alone (issue 17: read commands within 0.5 s).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from ops.cli.errors import CliError, Interrupted, quoted
from ops.cli.output import echo
from shared.paths import runtime_dir

if TYPE_CHECKING:  # imported where used: a CLI call loads only what its command needs (issue 17)
    import redis.asyncio as aioredis
    from nats.aio.client import Client as NatsClient
    from rich.console import Console, RenderableType

    from shared.envsettings import EnvSettings
    from shared.settings import Settings

    AnySettings = Settings | EnvSettings

T = TypeVar("T")

CONNECT_TIMEOUT_S = 2.0
STACK_HINT = "is the stack running? start it with `gantry up` (or set --nats-url/--redis-url)"
URL_FLAGS = {"--nats-url": "GANTRY_NATS_URL", "--redis-url": "GANTRY_REDIS_URL"}
"""Every command's connection flags, and the environment variable that carries the same URL."""


def overrides(nats_url: str | None = None, redis_url: str | None = None) -> dict[str, Any]:
    """What the CLI sets over the environment: its identity, `gantry up --tls`'s CA, the URL flags."""
    found: dict[str, Any] = {}
    if not os.environ.get("GANTRY_IDENTITY"):
        found["identity"] = "cli"  # the operator's identity from `gantry up`'s credentials (ops.auth)
    ca = runtime_dir() / "tls" / "ca.pem"  # `gantry up --tls`'s CA (harmless to a server without TLS)
    if not os.environ.get("GANTRY_TLS_CA_FILE") and ca.exists():
        found["tls_ca_file"] = str(ca)
    for field, flag, url in (("nats_url", "--nats-url", nats_url), ("redis_url", "--redis-url", redis_url)):
        if url:
            refuse_secret(flag, url)
            found[field] = url
    return found


def refuse_secret(flag: str, url: str) -> None:
    """A CliError (exit 2) when ``url``, the value click parsed for ``flag``, holds a user or secret.

    ``ops.cli.main`` refuses such a URL by scanning the raw words before anything runs; this is the same check
    on the value a command receives, whatever form click took it in (a form the scan does not foresee cannot
    slip past: the URL flags are the only way a URL gets here, the environment goes through Settings)."""
    from shared.envsettings import credentials_on_command_line

    if refused := credentials_on_command_line(flag, url, URL_FLAGS[flag]):
        raise CliError(refused, exit_code=2)


def load(nats_url: str | None = None, redis_url: str | None = None) -> Settings:
    """Settings with any flag overrides applied; invalid environment values become a CliError."""
    from pydantic import ValidationError

    from shared.settings import Settings, setting_error

    found = overrides(nats_url, redis_url)
    try:
        return Settings(**found)
    except ValidationError as err:
        given = {"nats_url": "--nats-url", "redis_url": "--redis-url"}
        flags = {field: flag for field, flag in given.items() if field in found}
        raise CliError(setting_error(err, flags), exit_code=2) from None


def connection_settings(nats_url: str | None = None, redis_url: str | None = None) -> AnySettings:
    """The settings ``load`` gives, read without pydantic when every value is plainly valid (the usual case);
    otherwise ``load`` itself, so a bad value gets the same one-line error either way."""
    from shared.envsettings import read

    return read(overrides(nats_url, redis_url)) or load(nats_url, redis_url)


RECONNECT_WAIT_S = 0.5  # between a watching connection's tries to reach NATS again


async def connect_nats(settings: AnySettings, timeout: float = CONNECT_TIMEOUT_S,
                       reconnect_s: float = 0.0) -> NatsClient:
    """A NATS connection, or a one-line CliError if the server cannot be reached quickly. It closes when NATS goes
    away, unless ``reconnect_s``: then it is reached again for about that long first (a command watching for a
    while outlives a NATS restarted under it, as `gantry up` restarts a crashed one), and closes after."""
    import asyncio

    nats = import_nats(settings.nats_url)

    from shared.bus.connection import nats_options

    async def _quiet(_: Exception) -> None:
        return None

    # nats-py keeps retrying a refused connection until its own timeout; a plain TCP probe first turns
    # "nothing listens there" into an immediate, precise answer.
    await _probe(settings.nats_url, 4222, "NATS", timeout)
    try:
        return await asyncio.wait_for(
            nats.connect(
                settings.nats_url,
                connect_timeout=max(1, int(timeout)),
                allow_reconnect=reconnect_s > 0,
                max_reconnect_attempts=max(0, round(reconnect_s / RECONNECT_WAIT_S)),
                reconnect_time_wait=RECONNECT_WAIT_S,
                error_cb=_quiet,
                **nats_options(settings),
            ),
            timeout=timeout + 1,
        )
    except (TimeoutError, OSError, nats.errors.Error) as err:
        if isinstance(err, nats.errors.AuthorizationError) or "authorization violation" in str(err).lower():
            raise CliError(refused_credentials("NATS", settings.nats_url, settings)) from None
        raise CliError(f"cannot reach NATS at {redact(settings.nats_url)} ({_short(err)}): {STACK_HINT}") from None


def refused_credentials(server: str, url: str, settings: AnySettings) -> str:
    """The error for a server that answered but refused the CLI's identity: most often the CLI reads another
    home's credentials than the `gantry up` that started the stack (another checkout, GANTRY_HOME unset)."""
    from shared.envsettings import credentials_path

    path = credentials_path(settings.credentials_file)
    found = "" if path.is_file() else ", which does not exist"
    return (f"{server} at {redact(url)} refused identity {quoted(settings.identity)} (secret read from {path}{found}):"
            " run the CLI with the GANTRY_HOME (or GANTRY_CREDENTIALS_FILE) of the `gantry up` running the stack")


def import_nats(url: str) -> ModuleType:
    """The nats package; unless ``url`` is a websocket URL, without its optional websocket transport, whose
    aiohttp import is a third of a CLI call's CPU. aiohttp stays importable for anything else afterwards."""
    if "nats" in sys.modules or urlsplit(url).scheme in ("ws", "wss") or "aiohttp" in sys.modules:
        import nats

        return nats
    sys.modules["aiohttp"] = None  # type: ignore[assignment]  # nats.aio.transport then skips it
    try:
        import nats
        import nats.js
    finally:
        del sys.modules["aiohttp"]
    return nats


async def _probe(url: str, default_port: int, what: str, timeout: float) -> None:
    import asyncio

    # nats-py reads a URL without a scheme ("10.0.0.5:4222", "nats-host") as "nats://" + it: probe that same server
    # (read as it was, such a URL had no host and the probe knocked at 127.0.0.1's default port instead)
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    try:
        host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    except ValueError as err:  # a port that is not a number or out of range
        raise CliError(f"invalid {what} URL {redact(url)}: {err}", exit_code=2) from None
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as err:
        reason = "connection refused" if isinstance(err, ConnectionRefusedError) else _short(err)
        shown = redact(url)
        raise CliError(f"cannot reach {what} at {shown} ({reason}): {STACK_HINT}") from None
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def connect_redis(settings: AnySettings, timeout: float = CONNECT_TIMEOUT_S) -> aioredis.Redis:
    """A Redis connection that answered PING, or a one-line CliError."""
    import redis.asyncio as aioredis
    import redis.exceptions

    try:
        client: aioredis.Redis = aioredis.from_url(
            settings.redis_url, socket_connect_timeout=timeout, socket_timeout=timeout + 3
        )
    except ValueError as err:  # not a redis://, rediss:// or unix:// URL, or a malformed one
        raise CliError(f"invalid Redis URL {redact(settings.redis_url)}: {_short(err)}", exit_code=2) from None
    try:
        await client.ping()
    except Exception as err:  # redis raises several unrelated types for "not there"
        await client.aclose()
        if isinstance(err, redis.exceptions.AuthenticationError):
            raise CliError(refused_credentials("Redis", settings.redis_url, settings)) from None
        if isinstance(err, ConnectionRefusedError | redis.exceptions.ConnectionError) and "111" in str(err):
            err = ConnectionRefusedError("connection refused")
        raise redis_unreachable(settings, err) from None
    return client


def redis_unreachable(settings: AnySettings, err: BaseException) -> CliError:
    """The one line saying Redis could not be read."""
    return CliError(f"cannot reach Redis at {redact(settings.redis_url)} ({_short(err)}): {STACK_HINT}")


def run_async(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run one command's coroutine; Ctrl-C becomes ``Interrupted`` (the caller exits 130), a connection lost
    after it was made (the stack stopped under a ``--wait`` or ``events --follow``) a one-line CliError."""
    import asyncio

    try:
        return asyncio.run(_as_coro(coro_fn))
    except KeyboardInterrupt:
        raise Interrupted from None
    except Exception as err:
        if (server := lost_server(err)) is None:
            raise
        raise CliError(f"lost the connection to {server} ({_short(err)}): {LOST_HINT}") from None


LOST_HINT = "did the stack stop? `gantry status` says"


def lost_server(err: BaseException) -> str | None:
    """``"Redis"`` or ``"NATS"`` when ``err`` is that client's error for a server gone or not answering, else
    None. Only the client modules a command loaded are looked at (importing one here would cost a read command
    its speed)."""
    redis_errors = sys.modules.get("redis.exceptions")
    if redis_errors is not None and isinstance(err, redis_errors.ConnectionError | redis_errors.TimeoutError):
        return "Redis"
    nats_errors = sys.modules.get("nats.errors")
    if nats_errors is not None and isinstance(
        err, nats_errors.ConnectionClosedError | nats_errors.NoServersError | nats_errors.UnexpectedEOF
        | nats_errors.StaleConnectionError
    ):
        return "NATS"
    return None


async def _as_coro(coro_fn: Callable[[], Awaitable[T]]) -> T:
    return await coro_fn()


def print_json(data: Any) -> None:
    """Print ``data`` (msgspec structs, dicts, lists) as indented JSON on stdout."""
    import msgspec

    echo(json.dumps(msgspec.to_builtins(data), indent=2, sort_keys=True))


def console(fit: RenderableType | None = None) -> Console:
    """The console tables are printed on (wide enough not to wrap in captured output), and wide enough for
    ``fit``'s columns when given: a narrower console cuts cells short ("44.…" for a hit rate of 44.4%)."""
    from rich.console import Console
    from rich.measure import Measurement

    width = max(120, Console().width)
    if fit is not None:
        roomy = Console(width=1000)
        width = max(width, Measurement.get(roomy, roomy.options, fit).maximum)
    return Console(highlight=False, soft_wrap=True, width=width)


def _short(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:120]


def redact(url: str) -> str:
    """A server URL with its password hidden (passwords never go to a terminal or a log)."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0] if ":" in creds else ""
    return f"{scheme}://{user}:***@{host}"
