"""``shared.settings.Settings`` read without pydantic, for short-lived clients (issue 17: `gantry models` and the
other read commands answer within 0.5 s; pydantic and pydantic-settings alone cost ~0.1 s of imports).

``read`` takes the same ``GANTRY_*`` variables (names case-insensitive, unknown ones ignored, keyword overrides
first) and the same credentials rule, but accepts a value only when its meaning is plain: any text for a text
field, an ordinary decimal within the field's bounds for a number. For anything else it answers None and the
caller builds ``Settings``, which then gives its own value or its own validation error: both ways agree on every
value this module accepts. ``EnvSettings`` declares Settings' fields again (names, defaults, bounds); a unit
test holds the two equal.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

from shared.paths import runtime_dir

CREDENTIALS_FILE = "credentials.json"
ENGINE_NATS_URL_ENV = "GANTRY_ENGINE_NATS_URL"
"""The engine identity's NATS URL, handed through the environment (never a command line, which any local user
can read in /proc): by `gantry up` to a fleet started with ``--engines``, and by that fleet to its servers."""
PREFIX = "GANTRY_"
_INT = re.compile(r"(0|[1-9][0-9]{0,8})")
_FLOAT = re.compile(r"(0|[1-9][0-9]{0,8})(\.[0-9]{1,9})?")


def _gt0() -> dict[str, float]:
    return {"gt": 0}


def _ge0() -> dict[str, float]:
    return {"ge": 0}


@dataclass(frozen=True)
class EnvSettings:
    """The fields of ``shared.settings.Settings`` (see there what each means), with the same defaults and bounds."""

    nats_url: str = "nats://127.0.0.1:4222"
    redis_url: str = "redis://127.0.0.1:6379/0"
    identity: str = ""
    tls_ca_file: str = ""
    credentials_file: str = ""
    heartbeat_interval_s: float = field(default=5.0, metadata=_gt0())
    not_ready_after_s: float = field(default=15.0, metadata=_gt0())
    reschedule_after_s: float = field(default=30.0, metadata=_gt0())
    drain_timeout_s: float = field(default=30.0, metadata=_ge0())
    profile: str = "default"
    ack_wait_s: float = field(default=10.0, metadata=_gt0())
    max_deliver: int = field(default=6, metadata={"ge": 1})
    js_storage: str = "file"
    pipe_max_bytes: int = field(default=16 << 20, metadata={"ge": 1 << 10, "le": 1 << 36})
    commit_retries: int = field(default=5, metadata=_ge0())
    commit_backoff_s: float = field(default=0.02, metadata=_ge0())
    batch_max: int = field(default=64, metadata={"ge": 1})
    command_linger_s: float = field(default=0.02, metadata=_ge0())
    status_linger_s: float = field(default=0.05, metadata=_ge0())
    reconcile_interval_s: float = field(default=1.0, metadata=_gt0())
    pending_retry_s: float = field(default=1.0, metadata=_gt0())
    pending_retry_max_s: float = field(default=8.0, metadata=_gt0())
    forget_after_s: float = field(default=600.0, metadata=_gt0())
    metrics_port: int = field(default=0, metadata={"ge": 0, "le": 65535})
    metrics_host: str = "0.0.0.0"
    web_port: int = field(default=8470, metadata={"ge": 0, "le": 65535})
    fit_cache_s: float = field(default=0.2, metadata=_ge0())


FIELDS: dict[str, dataclasses.Field[object]] = {f.name: f for f in dataclasses.fields(EnvSettings)}


def read(overrides: Mapping[str, object], environ: Mapping[str, str] | None = None) -> EnvSettings | None:
    """The settings from ``overrides`` then the environment, or None when a value is not plainly valid (then
    ``Settings`` decides). ``overrides`` are trusted values of the right type, as ``Settings(**overrides)``."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    seen: set[str] = set()
    for key, text in env.items():
        name = key.lower()
        if not name.startswith(PREFIX.lower()):
            continue
        name = name[len(PREFIX):]
        if name in seen:  # the same field spelt in two cases: Settings picks one, leave it to Settings
            return None
        seen.add(name)
        if name in FIELDS and name not in overrides:
            value = _plain(FIELDS[name], text)
            if value is None:
                return None
            values[name] = value
    values.update(overrides)
    if redis_url_problem(str(values.get("redis_url", ""))):  # Settings says what is wrong with it
        return None
    if any(port_problem(str(values.get(name, ""))) for name in ("nats_url", "redis_url")):
        return None
    try:
        return with_credentials(EnvSettings(**values))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def redis_url_problem(url: str) -> str | None:
    """What is wrong with ``url`` as a Redis URL that redis-py would accept anyway, else None.

    redis-py reads the database from a ``redis://`` URL's path and, when the path is not a number (or a number too
    long for ``int``), silently uses database 0: ``redis://host:6379/gantry`` would put the state beside whatever
    else lives in 0. A ``?db=`` in the query wins over the path, so a path naming another database is refused too."""
    try:
        parts = urlsplit(url)
    except ValueError as err:  # a bracketed host that is no IP address, or an unclosed bracket
        return f"not a valid URL ({err})"
    if parts.scheme not in ("redis", "rediss"):
        return None
    db = unquote(parts.path).strip("/")  # as redis-py reads it
    if db and not _db_number(db):
        return f"the database (the path of the URL) must be a number, got {db[:40]!r}"
    # as redis-py reads the query: blank values dropped (``?db=&db=3`` is database 3)
    query = [v.strip() for k, v in parse_qsl(parts.query) if k == "db"]
    if db and query and _db_number(query[0]) and int(query[0]) != int(db):
        return f"the URL names two databases: {db} in its path, {query[0]} in its query (redis-py uses the query's)"
    return None


def port_problem(url: str) -> str | None:
    """What is wrong with ``url``'s port (not a number, or past 0..65535), else None. Found where the setting is
    validated, so the error names the flag or the variable (whoever parsed the URL next said only "Port out of
    range"). The port's text is never shown: where a secret holds a '/', '?' or '#' the URL's host part ends
    there, and what urllib takes for the port is a piece of the secret ("nats://u:ab/cd@h:4222": 'ab')."""
    try:
        _ = urlsplit(url if "://" in url else f"nats://{url}").port  # nats-py reads a URL without a scheme so
    except ValueError as err:
        if str(err).startswith("Port out of range"):  # urllib's, naming no part of the URL
            return str(err)
        return "Port is not a number (a user or secret holding '/', '?' or '#' must be percent-encoded)"
    return None


def _db_number(text: str) -> bool:
    """A Redis database number as the URL may give it: plain ASCII digits, at most 5 (settings sit below the core:
    no ``limits.decimal`` here)."""
    return text.isascii() and text.isdigit() and len(text) <= 5


def _plain(spec: dataclasses.Field[object], text: str) -> object | None:
    """``text`` as the field's value if it is plainly one within the bounds, else None."""
    kind = spec.type
    if kind == "str":
        return text
    pattern, convert = (_INT, int) if kind == "int" else (_FLOAT, float)
    if not pattern.fullmatch(text):
        return None
    value = convert(text)
    bounds = spec.metadata
    if ("gt" in bounds and not value > bounds["gt"]) or ("ge" in bounds and not value >= bounds["ge"]):
        return None
    if "le" in bounds and not value <= bounds["le"]:
        return None
    return value


def with_credentials(settings: EnvSettings) -> EnvSettings:
    """Settings whose URLs carry the identity's secret from the credentials file (``Settings`` does the same)."""
    if not settings.identity:
        return settings
    secret = identity_secret(credentials_path(settings.credentials_file), settings.identity)
    if secret is None:
        return settings
    return dataclasses.replace(
        settings,
        nats_url=with_user(settings.nats_url, settings.identity, secret),
        redis_url=with_user(settings.redis_url, settings.identity, secret),
    )


def credentials_path(credentials_file: str) -> Path:
    """The credentials file a process reads: the configured one, else the one `gantry up` writes."""
    return Path(credentials_file) if credentials_file else runtime_dir() / CREDENTIALS_FILE


def identity_secret(path: Path, identity: str) -> str | None:
    """``identity``'s secret in the credentials file at ``path``; None when the file or the entry is missing."""
    try:
        found = json.loads(path.read_text()).get("identities", {}).get(identity)
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None


ENGINE_IDENTITY = "engine_server"  # the model servers' bus identity (ops.auth.ENGINE)


def with_user(url: str, user: str, secret: str) -> str:
    """``url`` with ``user:secret`` as its credentials, unless it names a user already or has no host. Both are
    percent-encoded (RFC 3986 userinfo): a secret holding ``@``, ``:``, ``/`` or ``#`` would otherwise change
    which host the URL names. The generated secrets (URL-safe base64) come out unchanged. (redis-py decodes
    userinfo; nats-py does not, so Gantry's NATS connections pass the decoded user and secret explicitly:
    ``shared.bus.connection.url_credentials``.)"""
    parts = urlsplit(url)
    if "@" in parts.netloc or not parts.hostname:
        return url
    _ = parts.port  # ValueError on a port out of range, as before (Settings reports it as the URL's error)
    netloc = f"{quote(user, safe='')}:{quote(secret, safe='')}@{parts.netloc}"
    return urlunsplit(parts._replace(netloc=netloc))


def without_user(url: str) -> str:
    """``url`` without any user or secret in it: what may be logged, shown or put on a command line."""
    try:
        parts = urlsplit(url)
    except ValueError:  # nothing of it is shown: its secret could be anywhere in it
        return "(a URL that does not parse)"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=host))


_QUERY_CREDENTIALS = frozenset({"password", "username", "user", "pass", "token"})  # query names of a secret


def credentials_on_command_line(flag: str, url: str | None, env: str) -> str | None:
    """The error for ``url`` given as ``flag`` on a command line when it holds a user or secret, else None.

    A command line is readable by every local user (``ps``), the environment of a process only by its owner. A
    user alone is refused too: a NATS URL's user part may be a token (``nats://TOKEN@host``)."""
    if not url:
        return None
    # nats-py reads a URL without a scheme as "nats://" + it (its user and secret are sent); redis-py takes a
    # password and user from the query too ("?password=...")
    try:
        parts = urlsplit(url if "://" in url else "nats://" + url)
    except ValueError as err:  # a bracketed host that is no IP address, or an unclosed bracket
        return f"{flag}: not a valid URL ({err})"
    query = {name.lower() for name, _ in parse_qsl(parts.query, keep_blank_values=True)}
    # (not ``without_user(url) != url``: that rewrites ``unix:///p``)
    if "@" in parts.netloc or query & _QUERY_CREDENTIALS:
        return (f"{flag} must not hold a user or secret (a command line is readable by every local user): "
                f"put that URL in ${env} instead")
    return None
